"""`routing.decide_route`, the router's decision as a pure function: no server, no I/O. The
decode pod follows the cached prefix; a long uncached prompt goes prefill -> decode when
prefill pods exist (or a gateway named one); a cached prompt stays on its pod alone."""

from __future__ import annotations

from vllm_llmd.router.latency import LatencyModels
from vllm_llmd.router.load import PodLoad
from vllm_llmd.router.routing import RoutingPolicy, decide_route
from vllm_llmd.router.scoring import PodCache, make_policy
from vllm_llmd.router.slo import SLO, RequestClass

BLOCK = 16
A, B, P = "http://a:1", "http://b:1", "http://p:1"
LOADS = {A: PodLoad(), B: PodLoad(), P: PodLoad()}


def _how() -> RoutingPolicy:
    return RoutingPolicy(make_policy("kv_aware"), None, LatencyModels(8), BLOCK, 64)


def _decide(num_blocks: int, caches: dict, prefill_pods: list[str], chosen: str | None = None):
    return decide_route(
        _how(),
        "req-1",
        num_blocks,
        num_blocks * BLOCK,
        RequestClass(SLO()),
        [A, B],
        prefill_pods,
        caches,
        LOADS,
        chosen,
    )


def test_the_decode_pod_is_the_one_holding_the_prefix():
    route = _decide(8, {B: PodCache(8, ("GPU",) * 8)}, [])
    assert route.decode.pod == B and route.prefill is None
    assert route.hit_tokens == 8 * BLOCK and route.request_id == "req-1"


def test_a_long_uncached_prompt_is_prefilled_elsewhere_and_a_cached_one_is_not():
    uncached = _decide(8, {}, [P])  # 128 uncached tokens > 64
    assert uncached.prefill is not None and uncached.prefill.pod == P
    assert uncached.prefill_shape is not None
    cached = _decide(8, {A: PodCache(6, ("GPU",) * 6)}, [P])  # 32 uncached tokens
    assert cached.decode.pod == A and cached.prefill is None


def test_a_prefill_named_upstream_is_honoured():
    route = _decide(1, {}, [], chosen="http://gateway-chosen:8000")
    assert route.prefill is not None and route.prefill.pod == "http://gateway-chosen:8000"
    assert route.prefill_shape is None  # not one of ours: no load known
