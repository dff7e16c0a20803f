"""The router's POST to a pod survives a pooled keep-alive connection the pod just closed
(uvicorn closes idle ones after 5 s; aiohttp can pick one in that instant): one retry on a
fresh connection, and the pod is not marked down for it. A real TCP server plays the pod:
it drops the first `drops` requests without an answer, then answers."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from vllm_llmd.router.config import parse_config
from vllm_llmd.router.metrics import RouterMetrics
from vllm_llmd.router.pods import PodRegistry
from vllm_llmd.router.proxy import Router
from vllm_llmd.router.scoring import make_policy

ANSWER = b'{"choices": [{"text": "ok"}]}'


async def _flaky_pod(drops: int) -> tuple[asyncio.Server, list[int]]:
    """A pod that reads each request, drops the first `drops` connections, answers after."""
    seen: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        await reader.readexactly(length)
        seen.append(len(seen))
        if len(seen) > drops:
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


@pytest.mark.parametrize(("drops", "answered"), [(0, True), (1, True), (2, False)])
def test_a_dropped_connection_is_retried_once(drops, answered):
    async def run() -> None:
        server, seen = await _flaky_pod(drops)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        router = _router(url)
        router.session = aiohttp.ClientSession()
        try:
            if answered:
                response = await router._post(url + "/v1/completions", {"prompt": "x"}, {})
                assert response.status == 200 and await response.read() == ANSWER
            else:
                with pytest.raises(aiohttp.ServerDisconnectedError):
                    await router._post(url + "/v1/completions", {"prompt": "x"}, {})
            assert len(seen) == min(drops + 1, 2)  # never more than one retry
        finally:
            await router.session.close()
            server.close()
            await server.wait_closed()

    asyncio.run(run())
