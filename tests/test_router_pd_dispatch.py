"""What the router learns and counts around a P/D route's two steps (router/dispatch.py):

- the prefill step is load on its prefill pod: while it runs, the router counts it there (in
  flight, prefilling, its uncached prompt tokens) as it counts what it sends a decode pod, so
  the next request's prefill-mode features (`ahead_tokens`) and the policy's load score see the
  prefill pod's queue at once instead of a scrape later (or, for `ahead_tokens`, never);
- the decode request reaches its pod once the prefill is done: the route's decode shape, what
  the decode model learns from, counts the prompt as cached there (it comes by transfer) and
  the work ahead there as that much further on;
- the TTFT prediction error is recorded only for what was predicted: a route's prediction is
  the decode pod computing alone, so a P/D decode's TTFT is not compared with it.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from router_harness import MODEL, RecordingPod

from vllm_llmd.devtools.client import metric_sum
from vllm_llmd.prometheus_text import parse_prometheus_text
from vllm_llmd.router.config import PodSpec
from vllm_llmd.router.dispatch import AnswerTiming, Dispatcher, learn_from_answer
from vllm_llmd.router.latency import LatencyModels, Prediction, RequestShape
from vllm_llmd.router.metrics import RouterMetrics
from vllm_llmd.router.pods import PodRegistry
from vllm_llmd.router.predictive import request_shape
from vllm_llmd.router.routing import Route
from vllm_llmd.router.scoring import Decision, ScoreInput
from vllm_llmd.router.slo import SLO, RequestClass

DECODE = "http://decode:1"


def _pd_route(prefill_pod: str) -> Route:
    """A 1500-token prompt routed prefill_pod -> DECODE, 800 tokens ahead of it on DECODE for
    0.1 s so far."""
    return Route(
        "req-1",
        Decision(DECODE, "decode", {DECODE: 1.0}, 0),
        Decision(prefill_pod, "prefill", {prefill_pod: 1.0}, 0),
        1500,
        0,
        {},
        RequestClass(SLO()),
        RequestShape(1500, 0, 800, 0, ahead_elapsed_s=0.1),
        prefill_shape=RequestShape(1500, 0, 0, 0),
    )


def test_a_running_prefill_counts_as_work_ahead_on_its_prefill_pod():
    async def run() -> None:
        pod = await RecordingPod().start()
        pod.delay_s = 0.5
        pod.answer = {"choices": [{"text": "x"}], "kv_transfer_params": {"id": "t"}}
        registry = PodRegistry((PodSpec.parse(f"{pod.url},role=prefill"),), None)
        dispatcher = Dispatcher(registry, LatencyModels(), RouterMetrics())
        route = _pd_route(pod.url)
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 4}
        try:
            async with aiohttp.ClientSession() as session:
                step = asyncio.create_task(
                    dispatcher.run_prefill(session, "/v1/completions", body, route)
                )
                while not pod.received:
                    await asyncio.sleep(0.01)
                state = registry.pods[pod.url]
                assert (state.in_flight, state.prefilling, state.prefill_tokens) == (1, 1, 1500)
                request = ScoreInput(12, [pod.url], loads=registry.loads())
                assert request_shape(request, pod.url, 600, 128).ahead_tokens == 1500
                decode_body = await step
            assert decode_body["kv_transfer_params"] == {"id": "t"}
            assert (state.in_flight, state.prefilling, state.prefill_tokens) == (0, 0, 0)
            # the decode request goes now: the decode pod's work ahead of it has run on for
            # the prefill's 0.5 s (what its decode model learns from)
            assert route.shape.ahead_tokens == 800
            assert 0.6 <= route.shape.ahead_elapsed_s < 0.9
            # and its prompt comes by transfer: cached there, none of it computed
            assert (route.shape.uncached_tokens, route.shape.cached_tokens) == (0, 1500)
        finally:
            await pod.stop()

    asyncio.run(run())


def test_a_prefill_that_hands_over_no_kv_leaves_the_decode_shape_as_it_was():
    """A prefill answer without kv_transfer_params: the decode pod computes the prompt itself,
    so what its model learns from keeps the prompt's tokens uncached."""

    async def run() -> None:
        pod = await RecordingPod().start()
        pod.answer = {"choices": [{"text": "x"}]}
        registry = PodRegistry((PodSpec.parse(f"{pod.url},role=prefill"),), None)
        dispatcher = Dispatcher(registry, LatencyModels(), RouterMetrics())
        route = _pd_route(pod.url)
        shape = route.shape
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 4}
        try:
            async with aiohttp.ClientSession() as session:
                decode_body = await dispatcher.run_prefill(session, "/v1/completions", body, route)
            assert decode_body == body and pod.received
            assert route.shape == shape
        finally:
            await pod.stop()

    asyncio.run(run())


@pytest.mark.parametrize("pd", [False, True])
def test_the_prediction_error_compares_a_direct_prediction_with_direct_answers_only(pd):
    metrics = RouterMetrics()
    prefill = Decision("http://prefill:1", "prefill", {}, 0) if pd else None
    route = Route(
        "req-1",
        Decision(DECODE, "decode", {DECODE: 1.0}, 0),
        prefill,
        1500,
        0,
        {},
        RequestClass(SLO()),
        RequestShape(1500, 0, 0, 0),
        prediction=Prediction(0.6, None),  # the decode pod computing the 1500 tokens alone
    )
    # streamed: first byte 0.05 s after sending (a P/D decode, its KV pulled), 3 events
    answer = AnswerTiming(sent=10.0, first_byte=10.05, end=10.1, num_events=3)
    learn_from_answer(LatencyModels(), metrics, route, {"stream": True}, answer)
    samples = parse_prometheus_text(metrics.render().decode())
    name = "llmd:router_ttft_prediction_relative_error_count"
    assert metric_sum(samples, name) == (0 if pd else 1)
    assert metric_sum(samples, "llmd:router_observed_ttft_seconds_count") == 1


def test_the_mean_miss_of_a_pods_predictions_is_exported():
    """The model predicts the typical answer; what the mean lies above it (a way of serving
    with a long tail) is a gauge per pod and mode, the same number P/D by cost adds."""
    metrics, latency = RouterMetrics(), LatencyModels(min_samples=1)
    shape = RequestShape(1500, 0, 0, 0)
    for i in range(40):
        route = Route(
            f"req-{i}",
            Decision(DECODE, "decode", {DECODE: 1.0}, 0),
            None,
            1500,
            0,
            {},
            RequestClass(SLO()),
            shape,
        )
        took = 1.6 if i % 4 == 3 else 0.1  # one answer in four starved
        answer = AnswerTiming(sent=10.0, first_byte=10.0 + took, end=10.5 + took, num_events=3)
        learn_from_answer(latency, metrics, route, {"stream": True}, answer)
    samples = parse_prometheus_text(metrics.render().decode())
    miss = metric_sum(samples, "llmd:router_ttft_mean_miss_seconds")
    assert miss == pytest.approx(latency.model(DECODE, "direct").mean_residual_s)
    assert 0.2 < miss < 0.5  # about a quarter of the 1.5 s tail above the typical answer
