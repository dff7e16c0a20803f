"""The Envoy stand-in (devtools/gateway.py) before the router's endpoint picker, over real gRPC
and real HTTP, without vLLM: recording pods (router_harness) answer, the picker runs in-process.

- a completion reaches the pod the picker named and its answer comes back, counted 200, in
  both body modes (BUFFERED requests with STREAMED answers, and FULL_DUPLEX_STREAMED);
- a streamed completion comes back chunk by chunk, as the pod sends it, and teaches the pod's
  latency model (TTFT and TPOT samples);
- a refusal (bad JSON: 400) reaches the client as the picker's immediate response;
- with a busy pod and an idle one, requests go to the idle one;
- a picked pod that is down (its port refuses connections): the request goes to the first
  fallback the picker named, which serves it and is counted as the pod that did;
- a client that leaves mid-answer cancels the stream: the picker counts a 499;
- the CLI serves the same gateway as a process of its own, and `running_gateway` on a thread
  of its own (for sync code) before a router process's picker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from router_harness import LOAD_METRICS, MODEL, RecordingPod, running_router
from test_router_epp import BUSY_METRICS, _completion, _endpoint, _requests_by_status, _until

from vllm_llmd.devtools.client import post_json
from vllm_llmd.devtools.gateway import EnvoyStandIn, running_gateway
from vllm_llmd.devtools.server import free_port
from vllm_llmd.router.epp import serve_epp
from vllm_llmd.router.proxy import Router

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("grpc_aio_poller_noise")]


class Pod(RecordingPod):
    """A recording pod that also records headers and streams SSE when asked to: its events
    after the first wait for `go` (so a test sees the first one arrive alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.headers_seen: list[dict[str, str]] = []
        self.go = asyncio.Event()

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        self.headers_seen.append({k.lower(): v for k, v in request.headers.items()})
        body = await request.json()
        if not body.get("stream"):
            return await super()._generate(request)
        self.received.append((request.path, body))
        answer = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await answer.prepare(request)
        with contextlib.suppress(ConnectionResetError):  # the gateway's client may leave
            for i in range(body["max_tokens"]):
                await answer.write(f'data: {{"choices": [{{"text": "t{i}"}}]}}\n\n'.encode())
                await self.go.wait()
                await asyncio.sleep(0.01)
            await answer.write(b"data: [DONE]\n\n")
            await answer.write_eof()
        return answer


@contextlib.asynccontextmanager
async def gateway(
    *pods: Pod, flags: tuple[str, ...] = (), full_duplex: bool = False
) -> AsyncIterator[tuple[Router, str, int]]:
    """(router, the stand-in's URL, the picker's port): a router's picker over the pods, and
    the stand-in before it."""
    args = [arg for pod in pods for arg in ("--pod", pod.url)]
    async with running_router([*args, *flags]) as (router, _):
        server, port = await serve_epp(router, "127.0.0.1", 0)
        try:
            async with EnvoyStandIn(f"127.0.0.1:{port}", full_duplex=full_duplex) as envoy:
                yield router, envoy.url, port
        finally:
            await server.stop(grace=None)


@contextlib.asynccontextmanager
async def pods(count: int = 1) -> AsyncIterator[list[Pod]]:
    started = [await Pod().start() for _ in range(count)]
    try:
        yield started
    finally:
        for pod in started:
            await pod.stop()


async def _post(url: str, body: bytes, **headers: str) -> tuple[int, Any, CIMultiDict[str]]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/v1/completions", data=body, headers=headers) as answer:
            return answer.status, json.loads(await answer.read()), CIMultiDict(answer.headers)


@pytest.mark.parametrize("full_duplex", [False, True], ids=["buffered", "full_duplex"])
async def test_a_completion_goes_to_the_picked_pod_and_back(full_duplex: bool) -> None:
    async with pods() as (pod,), gateway(pod, full_duplex=full_duplex) as (router, url, _):
        body = _completion(kv_transfer_params={"do_remote_prefill": True})
        evil = {"x-prefiller-host-port": "10.6.6.6:8000"}
        status, answer, headers = await _post(url, body, **evil)
        assert (status, answer) == (200, pod.answer)
        assert headers["x-routed-to"] == pod.url  # the picker's response header mutation
        ((path, received),) = pod.received
        assert path == "/v1/completions" and received["model"] == MODEL
        assert "kv_transfer_params" not in received  # the picker's body mutation
        (seen,) = pod.headers_seen
        assert seen["x-gateway-destination-endpoint"] == pod.url.removeprefix("http://")
        assert "x-prefiller-host-port" not in seen  # removed by the picker
        await _until(lambda: _requests_by_status(router) == {"200": 1})
        assert router.registry.state(pod.url).in_flight == 0


@pytest.mark.parametrize("full_duplex", [False, True], ids=["buffered", "full_duplex"])
async def test_a_streamed_completion_comes_back_in_chunks_and_teaches_latency(
    full_duplex: bool,
) -> None:
    async with pods() as (pod,), gateway(pod, full_duplex=full_duplex) as (router, url, _):
        model = router.latency.model(pod.url, "direct")
        before = (model.ttft.num_samples, model.tpot.num_samples)
        body = _completion(stream=True, max_tokens=3)
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/v1/completions", data=body) as answer:
                assert answer.status == 200
                assert answer.headers["content-type"].startswith("text/event-stream")
                first = await asyncio.wait_for(answer.content.readline(), 5)
                assert first.startswith(b"data: ") and b"t0" in first  # before the rest exists
                pod.go.set()
                rest = (await answer.read()).decode()
        events = [line for line in rest.splitlines() if line.startswith("data: ")]
        assert [e for e in events if "t1" in e or "t2" in e] and events[-1] == "data: [DONE]"
        await _until(lambda: (model.ttft.num_samples, model.tpot.num_samples) > before)
        assert (model.ttft.num_samples, model.tpot.num_samples) == (before[0] + 1, before[1] + 1)
        await _until(lambda: _requests_by_status(router) == {"200": 1})


async def test_a_refusal_reaches_the_client_as_the_pickers_immediate_response() -> None:
    async with pods() as (pod,), gateway(pod) as (router, url, _):
        status, answer, headers = await _post(url, b'{"model": ')
        assert status == 400 and "not valid JSON" in answer["error"]["message"]
        assert headers["content-type"].startswith("application/json")
        assert not pod.received
        await _until(lambda: _requests_by_status(router) == {"400": 1})


async def test_a_busy_pod_is_avoided_through_the_gateway() -> None:
    async with pods(2) as (busy, idle):
        flags = ("--poll-interval-s", "0.1")
        async with gateway(busy, idle, flags=flags) as (router, url, _):
            busy.metrics_text = BUSY_METRICS
            await _until(lambda: router.registry.state(busy.url).load.num_waiting == 12)
            for _ in range(3):
                assert (await _post(url, _completion()))[0] == 200
            assert (len(idle.received), len(busy.received)) == (3, 0)


@pytest.mark.parametrize("full_duplex", [False, True], ids=["buffered", "full_duplex"])
async def test_a_picked_pod_that_is_down_is_served_by_the_fallback(full_duplex: bool) -> None:
    async with pods(2) as (first, second):
        # the picker prefers `first` (idle); polled once, at the start: it still counts as
        # healthy when it goes down, as in the moments before a poll would notice
        second.metrics_text = LOAD_METRICS.replace("waiting 0", "waiting 2")
        flags = ("--policy", "load", "--poll-interval-s", "3600")
        async with gateway(first, second, flags=flags, full_duplex=full_duplex) as (
            router,
            url,
            _,
        ):
            await first.stop()
            status, answer, headers = await _post(url, _completion())
            assert (status, answer) == (200, second.answer)
            assert headers["x-routed-to"] == second.url  # who served it, as the gateway said
            assert len(second.received) == 1 and not first.received
            (seen,) = second.headers_seen
            named = [_endpoint(first.url), _endpoint(second.url)]
            assert seen["x-gateway-destination-endpoint"] == ",".join(named)
            await _until(lambda: _requests_by_status(router) == {"200": 1})
            assert router.metrics.routed.labels(second.url, "both")._value.get() == 1
            assert router.metrics.routed.labels(first.url, "both")._value.get() == 0
            # without fallbacks named, the same failure is the gateway's 503
            router.config = dataclasses.replace(router.config, epp_fallbacks=0)
            async with aiohttp.ClientSession() as session:
                async with session.post(url + "/v1/completions", data=_completion()) as failed:
                    assert failed.status == 503  # Envoy's local reply (text)
            assert len(second.received) == 1


async def test_a_client_that_leaves_mid_answer_is_counted_499() -> None:
    async with pods() as (pod,), gateway(pod) as (router, url, _):
        async with aiohttp.ClientSession() as session:
            body = _completion(stream=True, max_tokens=3)
            async with session.post(url + "/v1/completions", data=body) as answer:
                await asyncio.wait_for(answer.content.readline(), 5)
                answer.close()  # the pod is still answering
        await _until(lambda: _requests_by_status(router) == {"499": 1})
        await _until(lambda: router.registry.state(pod.url).in_flight == 0)
        pod.go.set()


async def test_the_cli_runs_the_gateway_as_a_process() -> None:
    async with pods() as (pod,), gateway(pod) as (router, _, epp_port):
        port = free_port()
        argv = [sys.executable, "-m", "vllm_llmd.devtools.gateway", "--port", str(port)]
        process = subprocess.Popen([*argv, "--epp", f"127.0.0.1:{epp_port}"])
        try:
            url = f"http://127.0.0.1:{port}"
            async with aiohttp.ClientSession() as session:
                for _ in range(200):  # ready once a GET without a body reaches the pod
                    with contextlib.suppress(aiohttp.ClientConnectionError):
                        async with session.get(url + "/health") as health:
                            assert health.status == 200 and await health.text() == "ok"
                            break
                    assert process.poll() is None
                    await asyncio.sleep(0.05)
            assert (await _post(url, _completion()))[:2] == (200, pod.answer)
            await _until(lambda: _requests_by_status(router) == {"200": 1})
            assert _requests_by_status(router, "other") == {"200": 1}
        finally:
            process.terminate()
            assert process.wait(10) == 0


async def test_running_gateway_serves_sync_code_from_a_thread(start_router: Any) -> None:
    """grpc.aio serves one event loop at a time in a process: the picker here is a router
    process (`--epp-port`), the test's loop only runs the pod."""
    async with pods() as (pod,):
        epp_port = free_port()
        flags = ["--pod", pod.url, "--epp-port", str(epp_port)]
        await asyncio.to_thread(start_router, flags, "gateway-router")

        def sync_client() -> dict[str, Any]:
            with running_gateway(epp_port) as url:
                return post_json(url + "/v1/completions", json.loads(_completion()))

        assert await asyncio.to_thread(sync_client) == pod.answer
