"""The router's HTTP client side: its session to the pods, one POST, a relayed answer.

Redirects are never followed: a pod's 3xx would re-send the request body (prompt, API key
headers) to wherever the pod points, also past the sidecar's prefill allowlist. A 3xx is an
upstream error (502) naming the pod.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from vllm_llmd.router.errors import JSONError, error

# Seconds an idle pooled connection to a pod is kept: below the pods' own keep-alive timeout
# (uvicorn: 5 s), so the router drops an idle connection before the pod does, instead of
# sending a request on one the pod is closing.
UPSTREAM_KEEPALIVE_S = 3.0
# headers of the pod's answer that must not be copied onto ours
HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "server", "date"}


class ClientLeft(Exception):
    """Our client closed its connection while its answer was being written."""


class NotStarted(Exception):
    """The pod could not be reached; nothing was sent to the client."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


def upstream_session(request_timeout_s: float) -> aiohttp.ClientSession:
    """The router's one client session to its pods. No connection limit: aiohttp's default (100)
    would hold the 101st concurrent request back inside the router, unseen by the pods' queues
    and the router's own admission; concurrency is bounded by the clients and by admission."""
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=UPSTREAM_KEEPALIVE_S)
    timeout = aiohttp.ClientTimeout(total=request_timeout_s)
    return aiohttp.ClientSession(connector=connector, timeout=timeout)


async def post(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str]
) -> aiohttp.ClientResponse:
    """POST without following redirects, with at most one retry: when the pod closed a pooled
    keep-alive connection as we sent (uvicorn closes idle ones after 5 s; aiohttp may pick one
    in that instant), the pod dropped the connection without an answer, or it was gone before
    the body was written, and the pod is not down. A failed connect (ClientConnectorError) is
    not retried: that pod is unreachable, and the caller tries the next one."""
    try:
        return await session.post(url, json=body, headers=headers, allow_redirects=False)
    except aiohttp.ClientConnectorError:
        raise
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
        return await session.post(url, json=body, headers=headers, allow_redirects=False)


def is_redirect(status: int) -> bool:
    return 300 <= status < 400


def redirect_error(pod: str, status: int) -> web.HTTPException:
    """The 502 for a pod that answered with a redirect (never followed)."""
    return error(
        web.HTTPBadGateway,
        f"pod {pod} answered {status}, a redirect: the router does not follow redirects",
    )


def upstream_error(status: int, answer: Any) -> web.HTTPException:
    """A pod's error answer, passed through with its status and body."""
    return JSONError(status, answer)


async def relay(
    upstream: aiohttp.ClientResponse,
    request: web.Request,
    pod: str,
    request_id: str,
    *,
    prefilled_by: str | None = None,
    on_first_byte: Callable[[], None] | None = None,
    before_eof: Callable[[float | None], None] | None = None,
) -> tuple[web.StreamResponse, float | None, int]:
    """Stream the pod's answer to our client: (our response, when its first byte came, the
    number of SSE events in it). ClientLeft when our client went away meanwhile.

    The answer names the pod that served it (`X-Routed-To`) and, for a P/D answer, the pod whose
    prefill it used (`X-Prefilled-By`). `on_first_byte()` runs when the answer's first byte
    comes; `before_eof(first_byte)` once the whole answer is relayed, before its end is sent:
    what it records is there when the client has the answer."""
    first_byte = None
    num_events = 0
    response = web.StreamResponse(status=upstream.status)
    for name, value in upstream.headers.items():
        if name.lower() not in HOP_HEADERS:
            response.headers[name] = value
    response.headers["X-Request-Id"] = request_id
    response.headers["X-Routed-To"] = pod
    if prefilled_by is not None:
        response.headers["X-Prefilled-By"] = prefilled_by
    try:
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            if first_byte is None:
                first_byte = time.monotonic()
                if on_first_byte is not None:
                    on_first_byte()
            num_events += chunk.count(b"data:")
            await response.write(chunk)
        if before_eof is not None:
            before_eof(first_byte)
        await response.write_eof()
    except ConnectionResetError as exc:  # our client's connection: a pod's comes as a
        raise ClientLeft() from exc  # ClientPayloadError from upstream.content
    return response, first_byte, num_events
