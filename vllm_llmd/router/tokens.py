"""Requests to vLLM block hashes: tokenize exactly as the pod's OpenAI server, then hash.

The router's read path starts here (llm-d's TokenProcessor): an OpenAI request body becomes
the token ids the engine will see and the hashes of its full blocks, in the int form KV events
publish, so the index can look them up. Tokenization mirrors vLLM 0.32 (`renderers/`,
`entrypoints/openai/*/protocol.py`):

- `/v1/completions`: a string prompt is encoded with `tokenizer(prompt, add_special_tokens=...)`
  (the request's flag, default True: BOS and friends as the tokenizer's post-processor adds
  them); a list of token ids passes through untouched.
- `/v1/chat/completions`: messages are normalized as vLLM's `parse_chat_messages` does for text
  (content parts joined with "\\n" for "string"-format templates, kept as `{"type": "text"}`
  parts for "openai"-format ones, the format detected from the template's AST as vLLM does;
  "developer" turns become "system" for templates without that role). The template is then
  rendered to *text* (`preprocess_chat` passes `tokenize=False` for HF tokenizers) with
  `add_generation_prompt` (default True), `continue_final_message` and the template kwargs,
  merged as vLLM merges them (request fields > `chat_template_kwargs` > the server's
  `--default-chat-template-kwargs`); the text is encoded with the request's
  `add_special_tokens`, default False: the template already wrote BOS and friends. A request
  carrying `kv_transfer_params["prompt_token_ids"]` (P/D decode reuse) keeps those ids.

Not covered (the router then has no cache estimate; it still routes on load): multimodal
content, prompt embeds, batched completion prompts, LoRA adapters (their path enters the
hash), `truncate_prompt_tokens`. Tool definitions are passed to the template as given, which
matches vLLM when the template does not print the tool JSON verbatim.

`verify_against_pod` checks all of this against a live pod (`POST /tokenize` for both
endpoints, block size and hash algorithm from `vllm:cache_config_info`), and
`verify_stored_event` checks block hashes (algorithm, seed, block size) against a `BlockStored`
event the pod published. The router must not route on cache affinity to a pod that fails them.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from vllm_llmd.hashing import EventBlockHash, PrefixHasher

# Probe inputs for verify_against_pod: mixed scripts, digits, runs of spaces, punctuation.
PROBE_TEXT = (
    "Routing probe: the quick brown fox jumps over 13 lazy dogs... twice!\n"
    "  Indented line\twith a tab, an accent (déjà vu), 漢字 and an emoji 🦊."
)
PROBE_MESSAGES = (
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": PROBE_TEXT},
)
# text content part types and the field holding their text (vLLM's TEXT_PART_TYPES)
_TEXT_PART_FIELDS = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "thinking": "thinking",
    "refusal": "refusal",
}
_CLAUDE_CODE_BILLING_HEADER = "x-anthropic-billing-header"
# chat request fields that change the prompt (vLLM's build_chat_params / build_tok_params)
_CHAT_OPTIONS = (
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
    "chat_template",
    "chat_template_kwargs",
    "tools",
    "documents",
    "reasoning_effort",
)


class UnsupportedRequestError(ValueError):
    """The request cannot be tokenized as the pod would (multimodal, batch, embeds, ...)."""


@dataclass(frozen=True, slots=True)
class TokenizedRequest:
    """The engine's view of one request: its prompt tokens and their full blocks' hashes."""

    token_ids: list[int]
    # one per full block of token_ids, as KV events publish them (64-bit ints)
    block_hashes: list[EventBlockHash]

    @property
    def num_blocks(self) -> int:
        return len(self.block_hashes)


@dataclass(frozen=True, slots=True)
class HashVerification:
    """Whether this router's tokens and hashes match a pod's, and if not, why."""

    ok: bool
    reason: str
    # the pod's block size and hash algorithm from vllm:cache_config_info (None: not exposed)
    pod_block_size: int | None = None
    pod_hash_algorithm: str | None = None


class TokenProcessor:
    """Tokenizes OpenAI requests with the model's own tokenizer and hashes their blocks.

    Args:
        model_path: local model folder (tokenizer.json / tokenizer_config.json); never the hub.
        block_size: the pods' block size (tokens per hashed block).
        hash_algorithm: the pods' `--prefix-caching-hash-algo`.
        hash_seed: the pods' PYTHONHASHSEED (default: ours, then vLLM's fixed sha256 seed).
        chat_template: the pods' `--chat-template` text, if they override the model's.
        chat_template_content_format: the pods' `--chat-template-content-format`.
        default_chat_template_kwargs: the pods' `--default-chat-template-kwargs`.
    """

    def __init__(
        self,
        model_path: str | Path,
        block_size: int,
        hash_algorithm: str = "sha256",
        hash_seed: str | None = None,
        *,
        chat_template: str | None = None,
        chat_template_content_format: str = "auto",
        default_chat_template_kwargs: Mapping[str, Any] | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        self.model_path = Path(model_path)
        self.hasher = PrefixHasher(block_size, hash_algorithm, hash_seed)
        self.tokenizer = _load_tokenizer(self.model_path, trust_remote_code)
        self._chat_template = chat_template
        self._default_kwargs = dict(default_chat_template_kwargs or {})
        if chat_template_content_format not in ("auto", "string", "openai"):
            raise ValueError(
                f"chat_template_content_format must be auto, string or openai, "
                f"not {chat_template_content_format!r}"
            )
        self._content_format = chat_template_content_format
        self._chat_kwarg_names = _apply_chat_template_params(self.tokenizer)

    @property
    def block_size(self) -> int:
        return self.hasher.block_size

    # ---- tokenization ----------------------------------------------------------------------

    def completion_token_ids(
        self, prompt: str | Sequence[int], *, add_special_tokens: bool = True
    ) -> list[int]:
        """The prompt tokens of a /v1/completions request (one prompt)."""
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
        if isinstance(prompt, Sequence) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            return list(prompt)
        raise UnsupportedRequestError("a completion prompt is a string or a list of token ids")

    def chat_token_ids(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        add_special_tokens: bool = False,
        chat_template: str | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, str]] | None = None,
        reasoning_effort: str | None = None,
    ) -> list[int]:
        """The prompt tokens of a /v1/chat/completions request (text messages only)."""
        template = self._resolve_template(chat_template, tools)
        content_format = self._content_format
        if content_format == "auto":
            content_format = detect_content_format(template)
        conversation = normalize_messages(messages, content_format)
        if any(m["role"] == "developer" for m in conversation) and not (
            '"developer"' in template or "'developer'" in template
        ):
            conversation = _developer_to_system(conversation)
        extra: dict[str, Any] = dict(
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            documents=documents,
            reasoning_effort=reasoning_effort,
        )
        request_kwargs = dict(chat_template_kwargs or {})
        if request_kwargs.keys() & {"chat_template", "tokenize"}:
            raise UnsupportedRequestError("chat_template_kwargs may not set chat_template/tokenize")
        if reasoning_effort is not None and "enable_thinking" not in request_kwargs:
            extra["enable_thinking"] = reasoning_effort != "none"
        # vLLM's merge_kwargs, twice: request fields over chat_template_kwargs over the
        # server's defaults, where None or "auto" leaves the value below in place
        kwargs = _merge(self._default_kwargs, _merge(request_kwargs, extra))
        accepted = self._chat_kwarg_names | _template_variables(template)
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        text = self.tokenizer.apply_chat_template(
            conversation,
            tools=tools,
            chat_template=template,
            tokenize=False,
            return_dict=False,
            **kwargs,
        )
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def hash(self, token_ids: list[int], *, cache_salt: str | None = None) -> TokenizedRequest:
        """Hash the full blocks of token_ids as the pods do."""
        return TokenizedRequest(
            token_ids, self.hasher.event_hashes(token_ids, cache_salt=cache_salt)
        )

    def tokenize_completion(
        self,
        prompt: str | Sequence[int],
        *,
        add_special_tokens: bool = True,
        cache_salt: str | None = None,
    ) -> TokenizedRequest:
        """`completion_token_ids`, hashed."""
        ids = self.completion_token_ids(prompt, add_special_tokens=add_special_tokens)
        return self.hash(ids, cache_salt=cache_salt)

    def tokenize_chat(
        self, messages: Sequence[Mapping[str, Any]], *, cache_salt: str | None = None, **options
    ) -> TokenizedRequest:
        """`chat_token_ids` (same options), hashed."""
        return self.hash(self.chat_token_ids(messages, **options), cache_salt=cache_salt)

    def tokenize_request(self, path: str, body: Mapping[str, Any]) -> TokenizedRequest:
        """Tokenize an OpenAI request body sent to `path` (/v1/completions or chat).

        Raises UnsupportedRequestError when the pod's tokens cannot be known here.
        """
        try:
            return self._tokenize_body(path.rstrip("/"), body)
        except UnsupportedRequestError:
            raise
        except Exception as exc:  # a malformed body or a template that raises: the pod decides
            raise UnsupportedRequestError(f"cannot tokenize the request: {exc!r}") from exc

    def _tokenize_body(self, path: str, body: Mapping[str, Any]) -> TokenizedRequest:
        salt = body.get("cache_salt")
        if path.endswith("/chat/completions"):
            reused = _reused_prompt_token_ids(body)
            if reused is not None:
                return self.hash(reused, cache_salt=salt)
            options = {k: body[k] for k in _CHAT_OPTIONS if body.get(k) is not None}
            return self.tokenize_chat(body.get("messages") or [], cache_salt=salt, **options)
        if path.endswith("/completions"):
            if body.get("prompt_embeds") is not None:
                raise UnsupportedRequestError("prompt_embeds requests have no token ids")
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
                if len(prompt) != 1:
                    raise UnsupportedRequestError("batched completion prompts are not routed")
                prompt = prompt[0]
            special = body.get("add_special_tokens", True)
            return self.tokenize_completion(prompt, add_special_tokens=special, cache_salt=salt)
        raise UnsupportedRequestError(f"no tokenization rule for {path}")

    def _resolve_template(self, chat_template: str | None, tools: list | None) -> str:
        # vLLM's order: the request's template, the server's --chat-template, the tokenizer's.
        try:
            template = self.tokenizer.get_chat_template(
                chat_template or self._chat_template, tools=tools
            )
        except ValueError as exc:
            raise UnsupportedRequestError(f"no chat template: {exc}") from None
        return template

    # ---- verification ----------------------------------------------------------------------

    def verify_stored_event(
        self, token_ids: Sequence[int], block_hashes: Sequence[int], block_size: int
    ) -> HashVerification:
        """Recompute the hashes of a prefix-start `BlockStored` (parent None, no extra keys)."""
        if block_size != self.block_size:
            return HashVerification(
                False, f"the pod hashes blocks of {block_size} tokens, the router {self.block_size}"
            )
        ours = self.hasher.event_hashes(list(token_ids))
        if list(block_hashes) != ours:
            return HashVerification(
                False,
                f"block hashes differ (pod {list(block_hashes)[:2]}..., router {ours[:2]}...): "
                f"the pods' --prefix-caching-hash-algo or PYTHONHASHSEED differs from "
                f"the router's ({self.hasher.algorithm})",
            )
        return HashVerification(True, f"{len(ours)} block hashes match")

    async def verify_against_pod(
        self,
        pod_url: str,
        model: str,
        *,
        session: Any = None,
        timeout: float = 10.0,
    ) -> HashVerification:
        """Probe a pod: its /tokenize (completion and chat) and its block size and algorithm.

        The hash seed cannot be read over HTTP: check it with `verify_stored_event` on the
        pod's first prefix-start BlockStored.

        Args:
            pod_url: the pod's base URL, e.g. "http://10.0.0.5:8000".
            model: the served model name.
            session: an aiohttp.ClientSession to reuse (one is made if None).
            timeout: seconds for each HTTP call.
        """
        import aiohttp

        if session is None:
            async with aiohttp.ClientSession() as own:
                return await self.verify_against_pod(pod_url, model, session=own, timeout=timeout)
        url = pod_url.rstrip("/")
        client_timeout = aiohttp.ClientTimeout(total=timeout)
        try:
            completion = await _post_tokenize(
                session, url, {"model": model, "prompt": PROBE_TEXT}, client_timeout
            )
            try:
                chat = await _post_tokenize(
                    session, url, {"model": model, "messages": list(PROBE_MESSAGES)}, client_timeout
                )
            except _RejectedProbe:  # a base model without a chat template: fine if ours has none
                chat = None
            async with session.get(url + "/metrics", timeout=client_timeout) as response:
                response.raise_for_status()
                metrics = await response.text()
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            return HashVerification(False, f"could not probe {url}: {exc!r}")
        block_size, algorithm = _cache_config(metrics)
        try:
            our_chat = self.chat_token_ids(PROBE_MESSAGES)
        except UnsupportedRequestError:
            our_chat = None
        problems = [
            f"{what} tokens differ: {_first_difference(ours, theirs)}"
            for what, ours, theirs in (
                ("completion", self.completion_token_ids(PROBE_TEXT), completion),
                ("chat", our_chat, chat),
            )
            if ours != theirs
        ]
        if block_size is not None and block_size != self.block_size:
            problems.append(f"the pod's block size is {block_size}, the router's {self.block_size}")
        if algorithm is not None and algorithm != self.hasher.algorithm:
            problems.append(
                f"the pod hashes with {algorithm}, the router with {self.hasher.algorithm}"
            )
        reason = "; ".join(problems) or "tokens, block size and hash algorithm match"
        return HashVerification(not problems, reason, block_size, algorithm)


# ---- helpers ------------------------------------------------------------------------------


def _load_tokenizer(model_path: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    if not model_path.is_dir():
        raise FileNotFoundError(
            f"{model_path} is not a model folder; the router loads the tokenizer from a local "
            "copy of the served model (no hub access)"
        )
    return AutoTokenizer.from_pretrained(
        model_path, trust_remote_code=trust_remote_code, local_files_only=True
    )


def _apply_chat_template_params(tokenizer: Any) -> frozenset[str]:
    # vLLM passes a chat kwarg on if apply_chat_template or the template names it.
    params = inspect.signature(type(tokenizer).apply_chat_template).parameters.values()
    named = {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return frozenset(named - {"chat_template", "tokenize", "self"})


@lru_cache(maxsize=32)
def _template_variables(template: str) -> frozenset[str]:
    import jinja2.meta

    return frozenset(jinja2.meta.find_undeclared_variables(_parse_template(template)))


def _parse_template(template: str) -> Any:
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(template).environment.parse(template)


@lru_cache(maxsize=32)
def detect_content_format(template: str) -> str:
    """vLLM's `_detect_content_format`: "openai" if the template loops over message content.

    Such templates get content as a list of `{"type": "text", "text": ...}` parts; the others
    get one string.
    """
    import jinja2.nodes as nodes

    try:
        root = _parse_template(template)
    except Exception:
        return "string"
    names = ["messages"]  # names bound to messages (or slices/filters of it)
    for name in names:
        for assign in root.find_all(nodes.Assign):
            if isinstance(assign.target, nodes.Name) and _accesses(assign.node, name):
                if assign.target.name not in names:
                    names.append(assign.target.name)
    message_vars = {
        loop.target.name
        for loop in root.find_all(nodes.For)
        if isinstance(loop.target, nodes.Name) and any(_accesses(loop.iter, n) for n in names)
    }
    in_macros: dict[int, set[str]] = {}  # loop id -> macro params fed a message's content
    for macro in root.find_all(nodes.Macro):
        params = {a.name for a in macro.args}
        fed: set[str] = set()
        for call in root.find_all(nodes.Call):
            if isinstance(call.node, nodes.Name) and call.node.name == macro.name:
                for arg, param in zip(call.args, macro.args, strict=False):
                    if any(_accesses(arg, v, "content") for v in message_vars):
                        fed.add(param.name)
                for kw in call.kwargs:
                    if kw.key in params and any(
                        _accesses(kw.value, v, "content") for v in message_vars
                    ):
                        fed.add(kw.key)
        for loop in macro.find_all(nodes.For):
            in_macros[id(loop)] = fed
    for loop in root.find_all(nodes.For):
        if any(_accesses(loop.iter, v, "content") for v in message_vars):
            return "openai"
        if isinstance(loop.iter, nodes.Name):
            fed = in_macros.get(id(loop))
            if fed is not None and loop.iter.name in fed:
                return "openai"
            if fed is None and loop.iter.name == "content":
                return "openai"
    return "string"


def _accesses(node: Any, var: str, key: str | None = None) -> bool:
    """Whether node reads `var` (or `var.key` / `var['key']`), through filters, tests, slices."""
    import jinja2.nodes as nodes

    if isinstance(node, (nodes.Filter, nodes.Test)):
        return node.node is not None and _accesses(node.node, var, key)
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice):
        return _accesses(node.node, var, key)
    if key is None:
        return isinstance(node, nodes.Name) and node.ctx == "load" and node.name == var
    if isinstance(node, nodes.Getitem):
        return (
            _accesses(node.node, var)
            and isinstance(node.arg, nodes.Const)
            and node.arg.value == key
        )
    return isinstance(node, nodes.Getattr) and _accesses(node.node, var) and node.attr == key


def normalize_messages(
    messages: Sequence[Mapping[str, Any]], content_format: str
) -> list[dict[str, Any]]:
    """Text chat messages as vLLM hands them to the template (`parse_chat_messages`)."""
    conversation = []
    for message in messages:
        role = message["role"]
        content = message.get("content")
        parts = [] if content is None else [content] if isinstance(content, str) else content
        if role == "system":
            parts = _strip_billing_header(parts)
        texts: list[Any] = []
        for part in parts:
            text = _text_part(part, wrap=content_format == "openai")
            if text is not None:
                texts.append(text)
        out: dict[str, Any] = {"role": role}
        out["content"] = texts if content_format == "openai" else "\n".join(texts)
        if role == "assistant":
            if message.get("tool_calls") is not None:
                out["tool_calls"] = _tool_calls(message["tool_calls"])
            if message.get("reasoning") is not None:
                out["reasoning"] = out["reasoning_content"] = message["reasoning"]
        elif role == "tool":
            if "tool_call_id" in message:
                out["tool_call_id"] = message["tool_call_id"]
            if isinstance(out["content"], list):
                out["content"] = "\n".join(p["text"] for p in out["content"])
        for key in ("name", "task"):
            if isinstance(message.get(key), str):
                out[key] = message[key]
        if role == "developer":
            out["tools"] = message.get("tools")
        conversation.append(out)
    return conversation


def _text_part(part: Any, wrap: bool) -> Any:
    if isinstance(part, str):
        return {"type": "text", "text": part} if wrap else part
    kind = part.get("type") if isinstance(part, Mapping) else None
    field = _TEXT_PART_FIELDS.get(kind)
    if field is None:
        raise UnsupportedRequestError(f"chat content part {kind!r} is not text")
    text = part.get(field)
    if text is None:
        return None
    if not wrap:
        return text
    extra = {k: v for k, v in part.items() if k not in ("type", "text", "thinking", "refusal")}
    return {"type": "text", "text": text, **extra}


def _strip_billing_header(parts: list[Any]) -> list[Any]:
    # vLLM drops Claude Code's per-request attribution line from system text (it would
    # break the prefix cache from there on).
    out = []
    for part in parts:
        text = part if isinstance(part, str) else part.get("text")
        if not (isinstance(text, str) and text.startswith(_CLAUDE_CODE_BILLING_HEADER)):
            out.append(part)
        elif rest := text.partition("\n")[2]:
            out.append(rest if isinstance(part, str) else {**part, "text": rest})
    return out


def _tool_calls(tool_calls: list[Any]) -> list[Any] | None:
    calls = []
    for call in tool_calls:
        call = dict(call)
        function = dict(call.get("function") or {})
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = {}
        function["arguments"] = arguments if isinstance(arguments, dict) else {}
        call["function"] = function
        calls.append(call)
    return calls


def _developer_to_system(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # vLLM: templates without a developer role get those messages as system, merged first.
    converted = []
    for message in conversation:
        if message["role"] == "developer":
            message = {k: v for k, v in message.items() if k != "tools"} | {"role": "system"}
        converted.append(message)
    systems = [i for i, m in enumerate(converted) if m["role"] == "system"]
    if not systems or systems == [0]:
        return converted
    contents = []
    for i in systems:
        content = converted[i].get("content", "")
        if isinstance(content, list):
            content = "\n".join(p["text"] if isinstance(p, dict) else p for p in content)
        if content:
            contents.append(content)
    rest = [m for m in converted if m["role"] != "system"]
    return [{"role": "system", "content": "\n\n".join(contents)}, *rest]


def _merge(defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    return {**defaults, **{k: v for k, v in overrides.items() if v is not None and v != "auto"}}


def _reused_prompt_token_ids(body: Mapping[str, Any]) -> list[int] | None:
    params = body.get("kv_transfer_params")
    ids = params.get("prompt_token_ids") if isinstance(params, Mapping) else None
    if ids is None or body.get("echo"):
        return None
    if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
        raise UnsupportedRequestError("kv_transfer_params.prompt_token_ids is not a list of ints")
    return ids


class _RejectedProbe(ValueError):
    """The pod answered the probe with an error status."""


async def _post_tokenize(session: Any, url: str, body: dict[str, Any], timeout: Any) -> list[int]:
    async with session.post(url + "/tokenize", json=body, timeout=timeout) as response:
        if response.status != 200:
            raise _RejectedProbe(
                f"/tokenize answered {response.status}: {(await response.text())[:300]}"
            )
        return list((await response.json())["tokens"])


def _cache_config(metrics_text: str) -> tuple[int | None, str | None]:
    from vllm_llmd.devtools.client import parse_prometheus_text

    lines = [
        line for line in metrics_text.splitlines() if line.startswith("vllm:cache_config_info")
    ]
    for (name, labels), _ in parse_prometheus_text("\n".join(lines) + "\n").items():
        if name == "vllm:cache_config_info":
            info = dict(labels)
            size = info.get("block_size")
            return (int(size) if size and size.isdigit() else None), info.get(
                "prefix_caching_hash_algo"
            )
    return None, None


def _first_difference(ours: list[int] | None, theirs: list[int] | None) -> str:
    if ours is None or theirs is None:
        return "the " + ("router" if ours is None else "pod") + " has no chat template"
    index = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None)
    if index is None:
        index = min(len(ours), len(theirs))
    return (
        f"first at index {index} of router {len(ours)} / pod {len(theirs)} tokens "
        f"(router {ours[index : index + 4]}, pod {theirs[index : index + 4]})"
    )
