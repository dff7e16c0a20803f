"""The router as a Gateway API Inference Extension endpoint picker (router/epp.py), spoken to
over a real gRPC channel as Envoy's ext_proc filter speaks: `ProcessingRequest`s with the
request's headers (a HeaderMap of raw_value bytes), its body in one or several chunks, then
the pod's answer (headers, body, trailers). The pods are `RecordingPod`s (router_harness): the
picker only names them, the gateway would forward.

- BUFFERED: headers pass, the body's answer routes (header + `envoy.lb` metadata, same IP:PORT);
- FULL_DUPLEX_STREAMED in several chunks: the headers' answer waits for the body's end, then
  the body comes back whole; the answer's chunks are passed back too;
- half-duplex STREAMED: each chunk passed on, the last one's answer routes;
- a request without a body is routed on its headers;
- refusals are immediate responses: 400 (bad JSON), 503 (no pod, or none in the gateway's
  subset), 429 with Retry-After (shed), all OpenAI-style JSON;
- P/D: the decode pod is named and the prefill pod goes in `x-prefiller-host-port`; a
  client's own prefiller header is removed;
- fallbacks: after the picked pod, up to --epp-fallbacks next-best healthy decode pods by the
  policy's scores (`IP:PORT,IP:PORT,...`, header and metadata alike), within the subset;
  served by one (the gateway says so), it is counted as the pod that served;
- --epp-target-port: decode pods named (and read in subsets) on their sidecar's port;
- the decision is the proxy's: counted in llmd:router_* and audited;
- it routes on the loads the router polls: a pod reporting a long queue is avoided;
- a stream the gateway cancels mid-way (its client left) releases the pod's in-flight count,
  is counted once (499 before the answer's headers), and the picker goes on routing.

No Envoy binary can be installed here, so these tests drive the picker with a real gRPC client
(grpc.aio) speaking ext_proc v3 as Envoy does: the same messages, in the order and body modes
Envoy's filter sends them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HttpBody,
    HttpHeaders,
    HttpTrailers,
    ProcessingRequest,
    ProcessingResponse,
    ProtocolConfiguration,
)
from envoy.service.ext_proc.v3.external_processor_pb2_grpc import ExternalProcessorStub
from google.protobuf.json_format import MessageToDict
from router_harness import (
    LOAD_METRICS,
    MODEL,
    RecordingPod,
    read_audit,
    running_router,
    serve_on_loopback,
    url_of,
)

from vllm_llmd.devtools.server import free_port
from vllm_llmd.router.cli import build_app
from vllm_llmd.router.config_parse import parse_config
from vllm_llmd.router.epp import serve_epp
from vllm_llmd.router.proxy import Router
from vllm_llmd.router.tokens import TokenProcessor

BUFFERED = ProcessingMode.BodySendMode.BUFFERED
STREAMED = ProcessingMode.BodySendMode.STREAMED
FULL_DUPLEX = ProcessingMode.BodySendMode.FULL_DUPLEX_STREAMED
BLOCK = 16

# the async tests run on asyncio (anyio's pytest plugin)
pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("grpc_aio_poller_noise")]


def _endpoint(pod: str) -> str:
    return pod.removeprefix("http://")


def _headers(
    path: str = "/v1/completions",
    end_of_stream: bool = False,
    mode: int = BUFFERED,
    extra: dict[str, str] | None = None,
    subset: list[str] | None = None,
) -> ProcessingRequest:
    """The first message of a stream, as Envoy sends it (raw_value bytes, protocol config)."""
    values = {
        ":scheme": "http",
        ":authority": "gateway.example",
        ":method": "POST" if not end_of_stream else "GET",
        ":path": path,
        "content-type": "application/json",
        "x-request-id": "req-1",
        **(extra or {}),
    }
    header_map = HeaderMap(
        headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in values.items()]
    )
    message = ProcessingRequest(
        request_headers=HttpHeaders(headers=header_map, end_of_stream=end_of_stream),
        protocol_config=ProtocolConfiguration(
            request_body_mode=mode, response_body_mode=mode if mode == FULL_DUPLEX else BUFFERED
        ),
    )
    if subset is not None:
        filters = message.metadata_context.filter_metadata
        filters["envoy.lb.subset_hint"].update({"x-gateway-destination-endpoint-subset": subset})
    return message


def _body(chunk: bytes, end_of_stream: bool, *, response: bool = False) -> ProcessingRequest:
    """A request body chunk, or with `response` one of the pod's answer."""
    body = HttpBody(body=chunk, end_of_stream=end_of_stream)
    if response:
        return ProcessingRequest(response_body=body)
    return ProcessingRequest(request_body=body)


def _response_headers(status: int = 200, served: str | None = None) -> ProcessingRequest:
    header_map = HeaderMap(
        headers=[
            HeaderValue(key=":status", raw_value=str(status).encode()),
            HeaderValue(key="content-type", raw_value=b"application/json"),
        ]
    )
    message = ProcessingRequest(response_headers=HttpHeaders(headers=header_map))
    if served is not None:
        filters = message.metadata_context.filter_metadata
        filters["envoy.lb"].update({"x-gateway-destination-endpoint-served": served})
    return message


def _completion(**extra: Any) -> bytes:
    return json.dumps({"model": MODEL, "prompt": "hello there", "max_tokens": 2, **extra}).encode()


class Envoy:
    """One ext_proc stream, driven as Envoy's filter drives it."""

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self.call = call

    async def send(self, message: ProcessingRequest) -> None:
        await self.call.write(message)

    async def ask(self, message: ProcessingRequest) -> ProcessingResponse:
        """Send a message and wait for its answer (half-duplex)."""
        await self.call.write(message)
        return await self.read()

    async def read(self) -> ProcessingResponse:
        answer = await asyncio.wait_for(self.call.read(), 10)
        assert answer is not grpc.aio.EOF, "the picker ended the stream"
        return answer

    async def ended(self) -> bool:
        return await asyncio.wait_for(self.call.read(), 10) is grpc.aio.EOF


@contextlib.asynccontextmanager
async def picker(
    flags: list[str], tokens: TokenProcessor | None = None
) -> AsyncIterator[tuple[Router, Any]]:
    """(router, a function opening an `Envoy` stream) with the router's HTTP app and its
    endpoint picker on free loopback ports."""
    async with running_router(flags, tokens=tokens) as (router, _):
        server, port = await serve_epp(router, "127.0.0.1", 0)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = ExternalProcessorStub(channel)
        try:
            yield router, lambda: Envoy(stub.Process())
        finally:
            await channel.close()
            await server.stop(grace=None)


@contextlib.asynccontextmanager
async def picker_over_a_pod(
    flags: list[str] | None = None,
) -> AsyncIterator[tuple[RecordingPod, Router, Any]]:
    """`picker` over one recording pod (stopped at the end): (pod, router, open_)."""
    pod = await RecordingPod().start()
    try:
        async with picker(["--pod", pod.url, *(flags or [])]) as (router, open_):
            yield pod, router, open_
    finally:
        await pod.stop()


def _set_headers(common: Any) -> dict[str, str]:
    return {
        option.header.key: option.header.raw_value.decode()
        for option in common.header_mutation.set_headers
    }


def _destinations(answer: ProcessingResponse) -> tuple[dict[str, str], list[str]]:
    """(headers the answer sets, the endpoints of its envoy.lb destination: the picked one,
    then the fallbacks), the header's value checked to be the metadata's."""
    kind = answer.WhichOneof("response")
    assert kind in ("request_headers", "request_body"), answer
    common = getattr(answer, kind).response
    assert common.clear_route_cache
    metadata = MessageToDict(answer.dynamic_metadata)
    value = metadata["envoy.lb"]["x-gateway-destination-endpoint"]
    headers = _set_headers(common)
    assert headers["x-gateway-destination-endpoint"] == value  # the protocol: never two values
    return headers, value.split(",")


def _destination(answer: ProcessingResponse) -> tuple[dict[str, str], str]:
    """(headers the answer sets, the picked endpoint: the first of its envoy.lb destination)."""
    headers, endpoints = _destinations(answer)
    return headers, endpoints[0]


def _immediate(answer: ProcessingResponse) -> tuple[int, dict[str, Any], dict[str, str]]:
    assert answer.WhichOneof("response") == "immediate_response", answer
    reply = answer.immediate_response
    headers = {o.header.key.lower(): o.header.raw_value.decode() for o in reply.headers.set_headers}
    return reply.status.code, json.loads(reply.body), headers


async def _finish(envoy: Envoy, status: int = 200, served: str | None = None) -> None:
    """The pod's answer flows back through the filter (BUFFERED response body)."""
    answer = await envoy.ask(_response_headers(status, served))
    assert answer.WhichOneof("response") == "response_headers"
    answer = await envoy.ask(_body(b'{"choices": []}', True, response=True))
    assert answer.WhichOneof("response") == "response_body"
    await envoy.call.done_writing()
    assert await envoy.ended()


async def test_buffered_body_is_routed_on_its_last_chunk(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    pod = await RecordingPod().start()
    try:
        async with picker(["--pod", pod.url, "--audit-log", str(audit)]) as (router, open_):
            envoy = open_()
            passed = await envoy.ask(_headers())
            assert passed.WhichOneof("response") == "request_headers"
            assert not passed.request_headers.response.header_mutation.set_headers
            routed = await envoy.ask(_body(_completion(), True))
            headers, destination = _destination(routed)
            assert routed.WhichOneof("response") == "request_body"
            assert destination == headers["x-gateway-destination-endpoint"]
            assert destination == _endpoint(pod.url)
            assert "x-prefiller-host-port" not in headers
            assert not routed.request_body.response.HasField("body_mutation")
            assert router.registry.state(pod.url).in_flight == 1  # until the answer ends
            answer = await envoy.ask(_response_headers(200, destination))
            assert _set_headers(answer.response_headers.response)["x-routed-to"] == pod.url
            answer = await envoy.ask(_body(b"{}", True, response=True))
            assert answer.HasField("response_body")
            await envoy.call.done_writing()
            assert await envoy.ended()
            await asyncio.sleep(0.05)  # the servicer's clean-up after the stream's end
            assert router.registry.state(pod.url).in_flight == 0
            metrics = router.metrics
            decisions = metrics.decisions.labels(router.config.policy, "direct")._value.get()
            requests = metrics.requests.labels("/v1/completions", "200")._value.get()
            routed_total = metrics.routed.labels(pod.url, "both")._value.get()
            assert (decisions, requests, routed_total) == (1, 1, 1)
            assert not pod.received  # the gateway forwards, not the router
    finally:
        await pod.stop()

    (record,) = read_audit(audit)
    assert record["pod"] == record["served_pod"] == pod.url
    assert record["status"] == 200 and record["model"] == MODEL


async def test_full_duplex_body_in_chunks_is_routed_then_sent_back_whole() -> None:
    async with picker_over_a_pod() as (pod, _, open_):
        envoy = open_()
        body = _completion(prompt="a prompt sent in pieces " * 20)
        pieces = [body[:7], body[7:100], body[100:]]
        # Envoy does not wait for answers in this mode: everything goes first
        await envoy.send(_headers(mode=FULL_DUPLEX))
        for i, piece in enumerate(pieces):
            await envoy.send(_body(piece, i == len(pieces) - 1))
        headers, destination = _destination(await envoy.read())
        assert destination == headers["x-gateway-destination-endpoint"]
        assert destination == _endpoint(pod.url)
        sent_back = b""
        while True:
            answer = await envoy.read()
            chunk = answer.request_body.response.body_mutation.streamed_response
            sent_back += chunk.body
            if chunk.end_of_stream:
                break
        assert sent_back == body
        # the answer's chunks come back as they go (the picker owns them too)
        await envoy.send(_response_headers())
        assert (await envoy.read()).HasField("response_headers")
        for i, piece in enumerate([b'data: {"a": 1}\n\n', b"data: [DONE]\n\n"]):
            await envoy.send(_body(piece, i == 1, response=True))
            echoed = (await envoy.read()).response_body.response.body_mutation
            assert echoed.streamed_response.body == piece
            assert echoed.streamed_response.end_of_stream == (i == 1)
        await envoy.call.done_writing()
        assert await envoy.ended()


async def test_half_duplex_streamed_chunks_pass_and_the_last_routes() -> None:
    async with picker_over_a_pod() as (pod, _, open_):
        envoy = open_()
        body = _completion()
        assert (await envoy.ask(_headers(mode=STREAMED))).HasField("request_headers")
        first = await envoy.ask(_body(body[:10], False))
        assert first.HasField("request_body")
        assert not first.request_body.response.header_mutation.set_headers
        _, destination = _destination(await envoy.ask(_body(body[10:], True)))
        assert destination == _endpoint(pod.url)
        await _finish(envoy)


async def test_a_request_without_a_body_is_routed_on_its_headers() -> None:
    async with picker_over_a_pod() as (pod, router, open_):
        envoy = open_()
        routed = await envoy.ask(_headers("/v1/models", end_of_stream=True))
        assert routed.WhichOneof("response") == "request_headers"
        _, destination = _destination(routed)
        assert destination == _endpoint(pod.url)
        await _finish(envoy)
        assert router.metrics.requests.labels("other", "200")._value.get() == 1


async def test_bad_json_is_a_400_immediate_response() -> None:
    async with picker_over_a_pod() as (_, router, open_):
        envoy = open_()
        await envoy.ask(_headers())
        status, body, headers = _immediate(await envoy.ask(_body(b'{"model": ', True)))
        assert status == 400 and "not valid JSON" in body["error"]["message"]
        assert headers["content-type"].startswith("application/json")
        assert await envoy.ended()
        await asyncio.sleep(0.05)
        assert router.metrics.requests.labels("/v1/completions", "400")._value.get() == 1
        envoy = open_()  # no model: 400 too, as from the proxy
        await envoy.ask(_headers())
        status, body, _ = _immediate(await envoy.ask(_body(b'{"prompt": "x"}', True)))
        assert status == 400 and "'model'" in body["error"]["message"]


async def test_no_pod_is_a_503_immediate_response() -> None:
    pod = await RecordingPod().start()
    try:
        async with picker(["--pod", pod.url]) as (_, open_):
            envoy = open_()  # the gateway allows only an endpoint the router does not have
            await envoy.ask(_headers(subset=["10.9.9.9:8000"]))
            status, body, _ = _immediate(await envoy.ask(_body(_completion(), True)))
            assert status == 503 and body["error"]["code"] == 503
            envoy = open_()  # the subset names the pod: routed there
            await envoy.ask(_headers(subset=[f"{_endpoint(pod.url)},10.9.9.9:8000"]))
            _, destination = _destination(await envoy.ask(_body(_completion(), True)))
            assert destination == _endpoint(pod.url)
        await pod.stop()  # the registry's first poll finds no pod
        async with picker(["--pod", pod.url]) as (_, open_):
            envoy = open_()
            await envoy.ask(_headers())
            status, body, _ = _immediate(await envoy.ask(_body(_completion(), True)))
            assert status == 503 and "no healthy pod" in body["error"]["message"]
    finally:
        await pod.stop()


async def test_a_shed_request_is_a_429_with_retry_after() -> None:
    pod = await RecordingPod().start()  # its KV usage (0.1) is over --max-kv-usage
    flags = ["--pod", pod.url, "--policy", "slo", "--objective", "batch=-1"]
    flags += ["--max-kv-usage", "0.05"]
    try:
        async with picker(flags) as (router, open_):
            envoy = open_()
            await envoy.ask(_headers(extra={"x-llm-d-inference-objective": "batch"}))
            status, body, headers = _immediate(await envoy.ask(_body(_completion(), True)))
            assert status == 429 and "SLO" in body["error"]["message"]
            assert int(headers["retry-after"]) >= 1
            assert router.metrics.admissions.labels("-1", "shed")._value.get() == 1
    finally:
        await pod.stop()


async def test_pd_names_the_decode_pod_and_the_prefill_pod_in_the_sidecar_header(
    tiny_model: Path,
) -> None:
    decode, prefill = await RecordingPod().start(), await RecordingPod().start()
    flags = ["--pod", f"{decode.url},role=decode", "--pod", f"{prefill.url},role=prefill"]
    flags += ["--pd-threshold-tokens", "8"]
    try:
        tokens = TokenProcessor(tiny_model, BLOCK)
        async with picker(flags, tokens=tokens) as (router, open_):
            envoy = open_()
            await envoy.ask(_headers())
            long_prompt = _completion(prompt="a long uncached prompt " * 20)
            headers, destination = _destination(await envoy.ask(_body(long_prompt, True)))
            assert destination == _endpoint(decode.url)
            assert headers["x-prefiller-host-port"] == _endpoint(prefill.url)
            await _finish(envoy)
            assert router.metrics.decisions.labels(router.config.policy, "pd")._value.get() == 1
            # a client naming a prefill pod itself: not decided on, and removed
            envoy = open_()
            evil = {"x-prefiller-host-port": "10.6.6.6:8000"}
            await envoy.ask(_headers(extra=evil))
            routed = await envoy.ask(_body(_completion(prompt="hi"), True))
            headers, destination = _destination(routed)
            assert destination == _endpoint(decode.url)
            assert "x-prefiller-host-port" not in headers
            removed = routed.request_body.response.header_mutation.remove_headers
            assert "x-prefiller-host-port" in removed
    finally:
        await decode.stop()
        await prefill.stop()


async def test_a_clients_kv_transfer_params_are_removed_from_the_body() -> None:
    async with picker_over_a_pod() as (_, _, open_):
        envoy = open_()
        await envoy.ask(_headers())
        body = _completion(kv_transfer_params={"do_remote_prefill": True})
        routed = await envoy.ask(_body(body, True))
        mutation = routed.request_body.response.body_mutation
        forwarded = json.loads(mutation.body)
        assert "kv_transfer_params" not in forwarded and forwarded["model"] == MODEL
        headers, _ = _destination(routed)
        assert headers["content-length"] == str(len(mutation.body))
        envoy = open_()  # streamed half-duplex: its chunks went on, so refused
        await envoy.ask(_headers(mode=STREAMED))
        status, _, _ = _immediate(await envoy.ask(_body(body, True)))
        assert status == 400


async def test_request_trailers_end_a_body_without_end_of_stream() -> None:
    async with picker_over_a_pod() as (pod, _, open_):
        envoy = open_()
        await envoy.ask(_headers(mode=STREAMED))
        assert (await envoy.ask(_body(_completion(), False))).HasField("request_body")
        await envoy.send(ProcessingRequest(request_trailers=HttpTrailers()))
        _, destination = _destination(await envoy.read())
        assert destination == _endpoint(pod.url)
        assert (await envoy.read()).HasField("request_trailers")


async def test_the_cli_serves_the_picker_beside_the_proxy() -> None:
    pod = await RecordingPod().start()
    port = free_port()
    config = parse_config(["--pod", pod.url, "--epp-port", str(port)], environ={})
    runner = await serve_on_loopback(build_app(config))  # start-up starts the picker
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            envoy = Envoy(ExternalProcessorStub(channel).Process())
            routed = await envoy.ask(_headers("/v1/models", end_of_stream=True))
            assert _destination(routed)[1] == _endpoint(pod.url)
        async with aiohttp.ClientSession() as session:  # and the proxy still serves
            async with session.post(url_of(runner) + "/v1/completions", data=_completion()) as r:
                assert r.status == 200 and pod.received
    finally:
        await runner.cleanup()
        await pod.stop()


async def test_a_streamed_answer_through_the_gateway_teaches_the_pods_latency_model() -> None:
    """As the proxy's relayed answers do: TTFT from the routing answer to the first body chunk,
    TPOT from the SSE events, for the pod that served it."""
    async with picker_over_a_pod() as (pod, router, open_):
        model = router.latency.model(pod.url, "direct")
        before = (model.ttft.num_samples, model.tpot.num_samples)
        envoy = open_()
        await _streamed_until_the_answer(envoy, max_tokens=3)
        events = [b'data: {"t": 1}\n\n', b'data: {"t": 2}\n\ndata: {"t": 3}\n\n']
        events.append(b"data: [DONE]\n\n")
        for i, chunk in enumerate(events):
            await asyncio.sleep(0.01)  # the tokens take time to come
            await envoy.send(_body(chunk, i == len(events) - 1, response=True))
            await envoy.read()
        await envoy.call.done_writing()
        assert await envoy.ended()
        after = (model.ttft.num_samples, model.tpot.num_samples)
        assert after == (before[0] + 1, before[1] + 1)
        samples = router.metrics.model_samples.labels(pod.url, "direct")._value.get()
        assert samples == after[0]


async def _streamed_until_the_answer(envoy: Envoy, **completion: Any) -> None:
    """A streamed completion routed in FULL_DUPLEX mode, its body sent back whole, and the
    pod's answer headers passed: what follows are the answer's body chunks."""
    await envoy.send(_headers(mode=FULL_DUPLEX))
    await envoy.send(_body(_completion(stream=True, **completion), True))
    _, destination = _destination(await envoy.read())
    while not (
        await envoy.read()
    ).request_body.response.body_mutation.streamed_response.end_of_stream:
        pass
    await envoy.send(_response_headers(200, destination))
    assert (await envoy.read()).HasField("response_headers")


async def _until(condition: Any, timeout: float = 10.0) -> None:
    """Wait (on the event loop the router runs on) until condition() holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def _requests_by_status(router: Router, route: str = "/v1/completions") -> dict[str, float]:
    """llmd:router_requests_total{route} per status."""
    return {
        sample.labels["status"]: sample.value
        for family in router.metrics.requests.collect()
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels["route"] == route
    }


BUSY_METRICS = (
    "vllm:num_requests_waiting 12\nvllm:num_requests_running 8\nvllm:kv_cache_usage_perc 0.9\n"
)


async def test_a_busy_pod_is_avoided() -> None:
    """The picker routes on the loads the router polls from the pods' /metrics: once one pod
    reports a long queue, requests go to the idle one (no tokenizer: load alone decides)."""
    busy, idle = await RecordingPod().start(), await RecordingPod().start()
    flags = ["--pod", busy.url, "--pod", idle.url, "--poll-interval-s", "0.1"]
    try:
        async with picker(flags) as (router, open_):
            busy.metrics_text = BUSY_METRICS  # from the next poll on
            await _until(lambda: router.registry.state(busy.url).load.num_waiting == 12)
            assert router.registry.state(idle.url).load.num_waiting == 0
            for mode in (BUFFERED, FULL_DUPLEX, BUFFERED):
                envoy = open_()
                if mode == BUFFERED:
                    await envoy.ask(_headers())
                    _, destination = _destination(await envoy.ask(_body(_completion(), True)))
                    await _finish(envoy)
                else:
                    await envoy.send(_headers(mode=FULL_DUPLEX))
                    await envoy.send(_body(_completion(), True))
                    _, destination = _destination(await envoy.read())
                    await envoy.call.done_writing()
                    envoy.call.cancel()
                assert destination == _endpoint(idle.url)
            routed = router.metrics.routed  # the two answered (BUFFERED) ones
            assert routed.labels(idle.url, "both")._value.get() == 2
            assert routed.labels(busy.url, "both")._value.get() == 0
    finally:
        await busy.stop()
        await idle.stop()


async def test_fallbacks_follow_the_picked_pod_by_the_policys_scores() -> None:
    """`x-gateway-destination-endpoint: PICKED,NEXT,...` (header and envoy.lb alike): the
    policy's next best healthy decode pods, up to --epp-fallbacks, in the gateway's subset;
    never a pod that is down, a prefill pod, or one twice."""
    pods = [await RecordingPod().start() for _ in range(5)]
    idle, waiting_2, waiting_5, down, prefill = pods
    waiting_2.metrics_text = LOAD_METRICS.replace("waiting 0", "waiting 2")
    waiting_5.metrics_text = LOAD_METRICS.replace("waiting 0", "waiting 5")
    await down.stop()  # the router's first poll finds it down
    flags = ["--policy", "load", "--pod", f"{prefill.url},role=prefill"]
    flags += [arg for pod in (down, waiting_5, idle, waiting_2) for arg in ("--pod", pod.url)]
    try:
        for fallbacks, subset, expected in (
            (None, None, [idle, waiting_2, waiting_5]),  # the default: 2
            ("1", None, [idle, waiting_2]),
            ("0", None, [idle]),
            ("5", None, [idle, waiting_2, waiting_5]),
            ("2", [waiting_5, idle, down], [idle, waiting_5]),
        ):
            more = [] if fallbacks is None else ["--epp-fallbacks", fallbacks]
            async with picker([*flags, *more]) as (_, open_):
                envoy = open_()
                limit = None if subset is None else [_endpoint(pod.url) for pod in subset]
                await envoy.ask(_headers(subset=limit))
                _, endpoints = _destinations(await envoy.ask(_body(_completion(), True)))
                assert endpoints == [_endpoint(pod.url) for pod in expected], fallbacks
                # served by a fallback (the gateway reports it): counted and named as such
                answer = await envoy.ask(_response_headers(200, endpoints[-1]))
                routed_to = _set_headers(answer.response_headers.response)["x-routed-to"]
                assert routed_to == expected[-1].url
                await envoy.ask(_body(b"{}", True, response=True))
                await envoy.call.done_writing()
                assert await envoy.ended()
    finally:
        for pod in pods:
            await pod.stop()


async def test_the_pools_target_port_names_the_decode_pods_sidecar(tiny_model: Path) -> None:
    """--epp-target-port (overlays/gateway-pd): the decode pod is named on its routing
    sidecar's port, the gateway's subset and served reports are read on it too; the prefill
    pod (no pool member, never in a subset) is still chosen, on its own port (the sidecar
    calls its vLLM)."""
    decode, prefill = await RecordingPod().start(), await RecordingPod().start()
    flags = ["--pod", f"{decode.url},role=decode", "--pod", f"{prefill.url},role=prefill"]
    flags += ["--epp-target-port", "18080", "--pd-threshold-tokens", "8"]
    try:
        async with picker(flags, tokens=TokenProcessor(tiny_model, BLOCK)) as (router, open_):
            sidecar = _endpoint(decode.url).rsplit(":", 1)[0] + ":18080"
            envoy = open_()
            await envoy.ask(_headers(subset=[sidecar]))
            long_prompt = _completion(prompt="a long uncached prompt " * 20)
            headers, endpoints = _destinations(await envoy.ask(_body(long_prompt, True)))
            assert endpoints == [sidecar]
            assert headers["x-prefiller-host-port"] == _endpoint(prefill.url)
            await _finish(envoy, served=sidecar)
            assert router.metrics.routed.labels(decode.url, "decode")._value.get() == 1
            envoy = open_()  # the vLLM port is not in the pool: nothing to pick
            await envoy.ask(_headers(subset=[_endpoint(decode.url)]))
            assert _immediate(await envoy.ask(_body(_completion(), True)))[0] == 503
    finally:
        await decode.stop()
        await prefill.stop()


async def test_a_gateway_stream_cancelled_mid_way_releases_the_pod_and_counts_499() -> None:
    """Envoy cancels the ext_proc stream when its client goes away: the pod's in-flight count
    is released, the request is counted once (499 when no answer headers came), and the
    picker goes on routing the next streams."""
    async with picker_over_a_pod() as (pod, router, open_):
        state = router.registry.state(pod.url)
        # cancelled after the routing answer, before the pod's answer headers
        envoy = open_()
        await envoy.send(_headers(mode=FULL_DUPLEX))
        await envoy.send(_body(_completion(), True))
        _, destination = _destination(await envoy.read())
        assert destination == _endpoint(pod.url)
        assert state.in_flight == 1
        envoy.call.cancel()
        await _until(lambda: state.in_flight == 0)
        await _until(lambda: sum(_requests_by_status(router).values()) == 1)
        assert _requests_by_status(router) == {"499": 1}
        # cancelled in the middle of a streamed answer (headers and a chunk passed)
        envoy = open_()
        await _streamed_until_the_answer(envoy)
        await envoy.send(_body(b'data: {"t": 1}\n\n', False, response=True))
        assert (await envoy.read()).HasField("response_body")
        assert state.in_flight == 1
        envoy.call.cancel()
        await _until(lambda: state.in_flight == 0)
        await _until(lambda: sum(_requests_by_status(router).values()) == 2)
        # its body passed here unfinished: a client that left, as the proxy counts it
        assert _requests_by_status(router) == {"499": 2}
        # the next stream on the same picker still routes, and is counted as answered
        envoy = open_()
        await envoy.ask(_headers())
        _, destination = _destination(await envoy.ask(_body(_completion(), True)))
        assert destination == _endpoint(pod.url)
        await _finish(envoy)
        await _until(lambda: state.in_flight == 0)
        await _until(lambda: sum(_requests_by_status(router).values()) == 3)
        assert _requests_by_status(router) == {"499": 2, "200": 1}
        # llmd:router_routed_total counts answered requests: only the last one
        assert router.metrics.routed.labels(pod.url, "both")._value.get() == 1
