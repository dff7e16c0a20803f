"""The router's POST to a pod survives a pooled keep-alive connection the pod just closed
(uvicorn closes idle ones after 5 s; aiohttp can pick one in that instant): one retry on a
fresh connection, and the pod is not marked down for it. A real TCP server plays the pod: for
each connection in turn it drops the request without an answer ("drop"), resets the connection
before the body is written ("reset"), or answers ("answer", and every connection after the
scripted ones)."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import aiohttp
import pytest
from aiohttp import web
from router_harness import serve_on_loopback, url_of

from vllm_llmd.devtools.server import free_port
from vllm_llmd.router.config_parse import parse_config
from vllm_llmd.router.metrics import RouterMetrics
from vllm_llmd.router.pods import PodRegistry
from vllm_llmd.router.proxy import Router
from vllm_llmd.router.scoring import make_policy
from vllm_llmd.router.upstream import ClientLeft, post, relay, upstream_session

ANSWER = b'{"choices": [{"text": "ok"}]}'
# a body far larger than the socket buffers: a reset after the head lands while it is written
BIG_PROMPT = "x" * (16 << 20)


async def _scripted_pod(script: list[str]) -> tuple[asyncio.Server, list[str]]:
    """A pod that treats its n-th connection as script[n] says; returns what it did."""
    seen: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        action = script[len(seen)] if len(seen) < len(script) else "answer"
        seen.append(action)
        head = await reader.readuntil(b"\r\n\r\n")
        if action == "reset":  # RST at once: the client is still writing the body
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        await reader.readexactly(length)
        if action == "answer":
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(ANSWER)}\r\n\r\n".encode()
                + ANSWER
            )
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, seen


def _router(url: str) -> Router:
    config = parse_config(["--pod", url])
    registry = PodRegistry(config.pods, None)
    return Router(config, registry, None, None, make_policy("round_robin"), RouterMetrics())


@pytest.mark.parametrize(
    ("script", "error"),
    [
        ([], None),
        (["drop"], None),
        (["reset"], None),
        (["drop", "drop"], aiohttp.ServerDisconnectedError),
        (["reset", "reset"], aiohttp.ClientOSError),
    ],
)
def test_a_dropped_connection_is_retried_once(script, error):
    async def run() -> None:
        server, seen = await _scripted_pod(script)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        router = _router(url)
        router.session = upstream_session(30)
        body = {"prompt": BIG_PROMPT if "reset" in script else "x"}
        try:
            if error is None:
                response = await post(router.session, url + "/v1/completions", body, {})
                assert response.status == 200 and await response.read() == ANSWER
            else:
                with pytest.raises(error):
                    await post(router.session, url + "/v1/completions", body, {})
            assert len(seen) == min(len(script) + 1, 2)  # never more than one retry
        finally:
            await router.session.close()
            server.close()
            await server.wait_closed()

    asyncio.run(run())


def test_a_refused_connection_is_not_retried():
    """The pod is unreachable, not closing a stale connection: the caller moves on at once."""

    async def run() -> None:
        url = f"http://127.0.0.1:{free_port()}"
        router = _router(url)
        router.session = upstream_session(30)
        posts = 0
        session_post = router.session.post

        def counting_post(*args, **kwargs):
            nonlocal posts
            posts += 1
            return session_post(*args, **kwargs)

        router.session.post = counting_post
        try:
            with pytest.raises(aiohttp.ClientConnectorError):
                await post(router.session, url + "/v1/completions", {"prompt": "x"}, {})
            assert posts == 1
        finally:
            await router.session.close()

    asyncio.run(run())


async def _slow_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i in range(50):
        await response.write(f"data: {i}\n\n".encode())
        await asyncio.sleep(0.05)
    await response.write_eof()
    return response


def test_a_client_that_leaves_mid_stream_is_client_left():
    """relay() calls it ClientLeft (a 499, closed quietly) when our client's connection goes."""

    async def run() -> None:
        raised: list[type] = []

        pod = web.Application()
        pod.router.add_post("/v1/completions", _slow_stream)
        pod_runner = await serve_on_loopback(pod)
        pod_url = url_of(pod_runner)
        session = upstream_session(30)

        async def handler(request: web.Request) -> web.StreamResponse:
            try:
                upstream = await post(session, pod_url + "/v1/completions", {}, {})
                response, _, _ = await relay(upstream, request, pod_url, "id")
            except Exception as exc:
                raised.append(type(exc))
                raise
            return response

        router = web.Application()
        router.router.add_post("/v1/completions", handler)
        router_runner = await serve_on_loopback(router)
        url = url_of(router_runner) + "/v1/completions"
        try:
            async with aiohttp.ClientSession() as client:
                response = await client.post(url, json={})
                assert (await response.content.readline()).startswith(b"data: ")
                response.close()  # our client leaves
            deadline = time.monotonic() + 10
            while not raised and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert raised == [ClientLeft]
        finally:
            await session.close()
            await router_runner.cleanup()
            await pod_runner.cleanup()

    asyncio.run(run())
