"""What a client may send the router, checked before anything is done with it.

A client is not trusted with what only the router (or a trusted gateway) may decide:

- `kv_transfer_params` tells a pod to pull KV from a host or to pin blocks for a peer. Only the
  router's own P/D step sets them; a client's would make a decode pod load KV of its choosing
  into the prefix cache every user shares, open connections to any host, or (on `kv_both` pods,
  `do_remote_decode`) pin blocks and learn a transfer id. They are removed from every client
  body unless the router is told to trust its upstream (llm-d's EPP/sidecar setups).
- A request's own `chat_template` (or one in `chat_template_kwargs`) is code the router would
  run to tokenize: refused with 400 unless trusted, as vLLM does (`--trust-request-chat-template`).
- The body is JSON of bounded size (aiohttp's client_max_size) and bounded nesting.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from vllm_llmd.router.errors import JSONError, error, error_payload

# Deepest JSON nesting accepted: far above any OpenAI request (tool schemas included), far
# below Python's recursion limit, which every later step (forwarding, audit) must stay under.
MAX_JSON_DEPTH = 100
KV_TRANSFER_PARAMS = "kv_transfer_params"


def api_key_ok(authorization: str | None, api_key: str) -> bool:
    """Whether an Authorization header carries the key, compared in constant time."""
    # aiohttp keeps a header's non-UTF-8 bytes as surrogates, and Python a command line's or
    # environment's: bytes again on both sides, never an error
    given = (authorization or "").encode("utf-8", "surrogateescape")
    return hmac.compare_digest(given, f"Bearer {api_key}".encode("utf-8", "surrogateescape"))


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request's body as a JSON object; 400 (413 when too large) naming what is wrong."""
    try:
        text = await request.text()
    except web.HTTPRequestEntityTooLarge as exc:
        raise JSONError(exc.status, error_payload(type(exc), exc.text or "")) from None
    except UnicodeDecodeError as exc:
        raise error(web.HTTPBadRequest, f"the body is not valid JSON: {exc}") from None
    too_deep = f"the body nests JSON deeper than {MAX_JSON_DEPTH} levels"
    try:
        body = json.loads(text)
    except RecursionError:
        raise error(web.HTTPBadRequest, too_deep) from None
    except ValueError as exc:
        raise error(web.HTTPBadRequest, f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise error(web.HTTPBadRequest, "the body must be a JSON object")
    # fewer brackets than the limit cannot nest past it: most bodies skip the walk
    might_be_deep = text.count("[") + text.count("{") > MAX_JSON_DEPTH
    if might_be_deep and json_depth(body) > MAX_JSON_DEPTH:
        raise error(web.HTTPBadRequest, too_deep)
    return body


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0, `[]` is 1), without recursion."""
    deepest = 0
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def strip_kv_transfer_params(body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The body without a client's `kv_transfer_params`, and whether it had any."""
    if KV_TRANSFER_PARAMS not in body:
        return body, False
    return {k: v for k, v in body.items() if k != KV_TRANSFER_PARAMS}, True


def request_template_field(body: dict[str, Any]) -> str | None:
    """The field through which a request brings its own chat template, or None."""
    if body.get("chat_template") is not None:
        return "chat_template"
    kwargs = body.get("chat_template_kwargs")
    if isinstance(kwargs, dict) and kwargs.get("chat_template") is not None:
        return "chat_template_kwargs.chat_template"
    return None


def refuse_request_template(body: dict[str, Any]) -> None:
    """400 naming the field when a request brings its own chat template (not trusted)."""
    field = request_template_field(body)
    if field is not None:
        raise error(
            web.HTTPBadRequest,
            f"'{field}': this router does not render chat templates sent with a request "
            "(start it with --trust-request-chat-template to allow them)",
        )


def answer_tokens(body: Mapping[str, Any]) -> int:
    """The answer's length the body asks for (max_tokens or max_completion_tokens); 0: none
    said."""
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0
