"""gRPC health checking on the endpoint picker's port (router/epp_health.py), over a real
grpc.aio channel whose client builds its messages from the same run-time descriptors:

- the messages are grpc/health/v1/health.proto's on the wire (field numbers, enum values);
- Check: "", `readiness` and the ext_proc service are SERVING while a decode pod is healthy
  (as the proxy's /health is 200), NOT_SERVING once none is; `liveness` stays SERVING; an
  unknown service is NOT_FOUND;
- Watch: the status at once, then its change when the pod goes down; SERVICE_UNKNOWN for an
  unknown service;
- the ext_proc service answers on the same port beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from envoy.service.ext_proc.v3.external_processor_pb2_grpc import ExternalProcessorStub
from router_harness import RecordingPod, running_router
from test_router_epp import Envoy, _destination, _endpoint, _headers

from vllm_llmd.devtools.server import free_port
from vllm_llmd.router.epp import serve_epp
from vllm_llmd.router.epp_health import (
    EXT_PROC_SERVICE,
    NOT_SERVING,
    SERVICE_UNKNOWN,
    SERVING,
    HealthCheckRequest,
    HealthCheckResponse,
)

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("grpc_aio_poller_noise")]


class HealthClient:
    """grpc.health.v1.Health's two methods, as a probe or a gateway calls them."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=HealthCheckRequest.SerializeToString,
            response_deserializer=HealthCheckResponse.FromString,
        )
        self._watch = channel.unary_stream(
            "/grpc.health.v1.Health/Watch",
            request_serializer=HealthCheckRequest.SerializeToString,
            response_deserializer=HealthCheckResponse.FromString,
        )

    async def check(self, service: str) -> int:
        answer = await self._check(HealthCheckRequest(service=service), timeout=10)
        return int(answer.status)

    def watch(self, service: str) -> Any:
        return self._watch(HealthCheckRequest(service=service))


@contextlib.asynccontextmanager
async def health_over_a_pod() -> AsyncIterator[tuple[RecordingPod, grpc.aio.Channel]]:
    """(pod, a channel to the picker's port) with a router polling the pod every 0.1 s."""
    pod = await RecordingPod().start()
    try:
        flags = ["--pod", f"{pod.url},role=decode", "--poll-interval-s", "0.1"]
        async with running_router(flags) as (router, _):
            server, port = await serve_epp(router, "127.0.0.1", 0)
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            try:
                yield pod, channel
            finally:
                await channel.close()
                await server.stop(grace=None)
    finally:
        await pod.stop()


def test_the_messages_are_health_protos_on_the_wire() -> None:
    # field 1, length-delimited / varint: what grpcio-health-checking's classes write
    assert HealthCheckRequest(service="readiness").SerializeToString() == b"\n\treadiness"
    assert HealthCheckResponse(status=NOT_SERVING).SerializeToString() == b"\x08\x02"
    names = HealthCheckResponse.DESCRIPTOR.enum_types_by_name["ServingStatus"].values_by_name
    assert {name: value.number for name, value in names.items()} == {
        "UNKNOWN": 0,
        "SERVING": 1,
        "NOT_SERVING": 2,
        "SERVICE_UNKNOWN": 3,
    }
    assert HealthCheckRequest.DESCRIPTOR.full_name == "grpc.health.v1.HealthCheckRequest"


async def test_check_follows_the_decode_pods_health() -> None:
    async with health_over_a_pod() as (pod, channel):
        health = HealthClient(channel)
        for service in ("", "readiness", EXT_PROC_SERVICE, "liveness"):
            assert await health.check(service) == SERVING, service
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await health.check("some.other.Service")
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        # the ext_proc service on the same port
        envoy = Envoy(ExternalProcessorStub(channel).Process())
        routed = await envoy.ask(_headers("/v1/models", end_of_stream=True))
        assert _destination(routed)[1] == _endpoint(pod.url)
        envoy.call.cancel()
        await pod.stop()  # the next poll finds it down: no decode pod is healthy
        for _ in range(500):  # the router polls every 0.1 s
            if await health.check("") == NOT_SERVING:
                break
            await asyncio.sleep(0.02)
        assert await health.check("") == NOT_SERVING
        for service in ("readiness", EXT_PROC_SERVICE):
            assert await health.check(service) == NOT_SERVING, service
        assert await health.check("liveness") == SERVING


async def test_watch_sends_the_status_then_its_change() -> None:
    async with health_over_a_pod() as (pod, channel):
        health = HealthClient(channel)
        watch = health.watch(EXT_PROC_SERVICE)
        first = await asyncio.wait_for(watch.read(), 10)
        assert first.status == SERVING
        await pod.stop()
        changed = await asyncio.wait_for(watch.read(), 10)
        assert changed.status == NOT_SERVING
        watch.cancel()
        unknown = health.watch("some.other.Service")
        assert (await asyncio.wait_for(unknown.read(), 10)).status == SERVICE_UNKNOWN
        unknown.cancel()


async def test_the_cli_serves_health_on_the_epp_port(start_router: Any) -> None:
    """A router process with --epp-port: what a Kubernetes grpc probe reaches."""
    pod = await RecordingPod().start()
    try:
        epp_port = free_port()
        flags = ["--pod", pod.url, "--epp-port", str(epp_port)]
        await asyncio.to_thread(start_router, flags, "health-router")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{epp_port}") as channel:
            health = HealthClient(channel)
            assert await health.check("readiness") == SERVING
    finally:
        await pod.stop()
