"""Endpoint-picker decision latency: how long the router, as the Gateway API Inference
Extension's endpoint picker (`--epp-port`, router/epp.py), takes to name a pod, beyond
tokenization.

In one process: a router over `--pods` recording pods (tests/router_harness.py: real aiohttp
servers answering /health and /metrics; no tokenizer, so no tokenization and no index lookup:
the decision is checks, load and policy), its picker on a loopback gRPC port, and a real
grpc.aio client speaking ext_proc v3 as Envoy does. Each of `--requests` requests is one
`Process` stream, one at a time; the time measured is from writing the request body's last
chunk to reading the routing answer (the gRPC round trip, JSON parse, checks and
`Decider.decide`), in FULL_DUPLEX_STREAMED mode (the extension's gateways) and BUFFERED. For
comparison, the same decision taken through the proxy path's `Decider.decide` directly. The
client and the picker share one event loop and one core's worth of Python, so the figures
include the client's side of the round trip too.

Usage: `.venv/bin/python benchmarks/bench_epp.py [--requests 2000] [--pods 4]`. Goal (issue
#21): p99 <= 2 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import grpc
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HttpBody,
    HttpHeaders,
    ProcessingRequest,
    ProtocolConfiguration,
)
from envoy.service.ext_proc.v3.external_processor_pb2_grpc import ExternalProcessorStub

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))  # the tests' recording pods and router harness

from router_harness import MODEL, RecordingPod, running_router  # noqa: E402

from vllm_llmd.router.epp import serve_epp  # noqa: E402
from vllm_llmd.router.epp_wire import Headers  # noqa: E402
from vllm_llmd.router.proxy import Router  # noqa: E402
from vllm_llmd.router.request_record import RequestRecord  # noqa: E402

BUFFERED = ProcessingMode.BodySendMode.BUFFERED
FULL_DUPLEX = ProcessingMode.BodySendMode.FULL_DUPLEX_STREAMED
PATH = "/v1/chat/completions"
HEADERS = {
    ":scheme": "http",
    ":authority": "gateway.example",
    ":method": "POST",
    ":path": PATH,
    "content-type": "application/json",
}


def body(i: int, prompt_chars: int) -> bytes:
    text = (f"request {i}: " + "a question about the document " * prompt_chars)[:prompt_chars]
    message = {"role": "user", "content": text}
    return json.dumps({"model": MODEL, "messages": [message], "max_tokens": 16}).encode()


def headers_message(mode: int, i: int) -> ProcessingRequest:
    values = {**HEADERS, "x-request-id": f"bench-{i}"}
    header_map = HeaderMap(
        headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in values.items()]
    )
    return ProcessingRequest(
        request_headers=HttpHeaders(headers=header_map),
        protocol_config=ProtocolConfiguration(
            request_body_mode=mode, response_body_mode=mode if mode == FULL_DUPLEX else BUFFERED
        ),
    )


def response_headers() -> ProcessingRequest:
    header_map = HeaderMap(headers=[HeaderValue(key=":status", raw_value=b"200")])
    return ProcessingRequest(response_headers=HttpHeaders(headers=header_map))


async def one_stream(stub: ExternalProcessorStub, mode: int, raw: bytes, i: int) -> float:
    """One request through the picker; seconds from its body's last chunk to the routing
    answer. The rest of the stream (the body sent back, the pod's answer) is played out
    untimed, so the pod's in-flight count ends as in production."""
    call = stub.Process()
    await call.write(headers_message(mode, i))
    if mode != FULL_DUPLEX:
        await call.read()  # the headers pass
    half = len(raw) // 2
    await call.write(ProcessingRequest(request_body=HttpBody(body=raw[:half])))
    if mode != FULL_DUPLEX:
        await call.read()  # the first chunk's answer (BUFFERED: Envoy sends it whole)
    start = time.perf_counter()
    await call.write(ProcessingRequest(request_body=HttpBody(body=raw[half:], end_of_stream=True)))
    answer = await call.read()
    elapsed = time.perf_counter() - start
    assert answer.HasField("request_headers" if mode == FULL_DUPLEX else "request_body"), answer
    if mode == FULL_DUPLEX:  # the body comes back
        while True:
            chunk = (await call.read()).request_body.response.body_mutation.streamed_response
            if chunk.end_of_stream:
                break
    await call.write(response_headers())
    await call.read()
    await call.write(ProcessingRequest(response_body=HttpBody(body=b"{}", end_of_stream=True)))
    await call.read()
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    return elapsed


async def one_decision(router: Router, raw: bytes, i: int) -> float:
    """The same decision through the proxy path: parse, check, `Decider.decide`."""
    start = time.perf_counter()
    record = RequestRecord(PATH, time.time(), time.monotonic())
    headers = Headers({**HEADERS, "x-request-id": f"bench-{i}"})
    checked = router.checked_body(json.loads(raw))
    record.body = checked
    await router.decide(record, headers, checked)
    return time.perf_counter() - start


def summary(name: str, seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    p50 = statistics.median(ms)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return f"| {name} | {len(ms)} | {p50:.3f} | {p99:.3f} | {ms[-1]:.3f} |"


async def main(args: argparse.Namespace) -> None:
    pods = [await RecordingPod().start() for _ in range(args.pods)]
    flags = [arg for pod in pods for arg in ("--pod", pod.url)] + ["--policy", args.policy]
    bodies = [body(i, args.prompt_chars) for i in range(args.requests)]
    rows = []
    try:
        async with running_router(flags) as (router, _):
            server, port = await serve_epp(router, "127.0.0.1", 0)
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    stub = ExternalProcessorStub(channel)
                    for mode in (FULL_DUPLEX, BUFFERED):
                        for i in range(args.warmup):
                            await one_stream(stub, mode, bodies[i % len(bodies)], i)
                        times = [
                            await one_stream(stub, mode, raw, i) for i, raw in enumerate(bodies)
                        ]
                        name = ProcessingMode.BodySendMode.Name(mode)
                        rows.append(summary(f"picker, {name} (gRPC round trip)", times))
            finally:
                await server.stop(grace=None)
            for i in range(args.warmup):
                await one_decision(router, bodies[i % len(bodies)], i)
            times = [await one_decision(router, raw, i) for i, raw in enumerate(bodies)]
            rows.append(summary("proxy path: parse + Decider.decide", times))
    finally:
        for pod in pods:
            await pod.stop()
    print(
        f"\n{args.requests} requests, one at a time, {args.pods} pods, policy {args.policy}, "
        f"{len(bodies[0])}-byte bodies, no tokenizer\n"
    )
    print("| path | requests | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--pods", type=int, default=4)
    parser.add_argument("--prompt-chars", type=int, default=2000)
    policies = ["kv_aware", "round_robin", "load", "prefix", "slo"]
    parser.add_argument("--policy", default="kv_aware", choices=policies)
    asyncio.run(main(parser.parse_args()))
