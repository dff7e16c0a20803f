"""A pod whose KV cache cannot hold a request beside the router's requests in flight there is
saturated for that request: vLLM would queue it until one ends, and evict the cached prefixes
the router counts on meanwhile (on a cache of 16 blocks, two 10-block prompts of different
prefixes took turns recomputing each other's: 2-3 s TTFTs predicted at 0.4 s)."""

from __future__ import annotations

import pytest

from vllm_llmd.router.config import PodSpec
from vllm_llmd.router.config_parse import parse_config
from vllm_llmd.router.decision import Decider
from vllm_llmd.router.index import InMemoryIndex
from vllm_llmd.router.latency import LatencyModels
from vllm_llmd.router.load import PodLoad, pod_load_from_metrics
from vllm_llmd.router.metrics import RouterMetrics
from vllm_llmd.router.pod_state import PodState, Sending, pods_without_room
from vllm_llmd.router.pods import PodRegistry
from vllm_llmd.router.predictive import SLOPlanner
from vllm_llmd.router.scoring import (
    PodCache,
    ScoreInput,
    ScoringConfig,
    kv_gauge_full,
    make_policy,
)

GAUGES = "\n".join(
    [
        'vllm:num_requests_waiting{engine="0"} 0.0',
        'vllm:num_requests_running{engine="0"} 1.0',
        'vllm:kv_cache_usage_perc{engine="0"} 0.5',
    ]
)


def info(engine: int, blocks: str) -> str:
    return (
        f'vllm:cache_config_info{{block_size="128",engine="{engine}",'
        f'num_gpu_blocks="{blocks}",enable_prefix_caching="True"}} 1.0'
    )


def test_the_kv_cache_size_is_read_from_cache_config_info():
    assert pod_load_from_metrics(GAUGES).kv_blocks == 0  # not exposed: not known
    assert pod_load_from_metrics(GAUGES + "\n" + info(0, "15")).kv_blocks == 15
    # data parallel: a request lands on one engine, so the smallest is what it can count on
    two = GAUGES + "\n" + info(0, "40") + "\n" + info(1, "32")
    assert pod_load_from_metrics(two).kv_blocks == 32
    assert pod_load_from_metrics(GAUGES + "\n" + info(0, "None")).kv_blocks == 0


def pod_with(capacity: int) -> PodState:
    pod = PodState(PodSpec.parse("http://pod-a"))
    pod.load = PodLoad(kv_blocks=capacity)
    return pod


def test_shared_prompt_blocks_are_held_once_and_released_when_the_request_ends():
    pod = pod_with(15)
    doc_a, doc_b = list(range(8)), list(range(100, 108))
    first = Sending(pod, 1100, doc_a, 2)
    second = Sending(pod, 100, doc_a, 2)  # the same document: its 8 blocks are shared
    assert pod.current_load().held_blocks == 8 + 2 + 2
    assert pod.current_load().kv_blocks == 15
    assert not pod.lacks_room(doc_a, 2)  # 12 + 2 new: fits
    assert pod.lacks_room(doc_b, 2)  # 12 + 10 new > 15
    first.ended()
    assert pod.current_load().held_blocks == 8 + 2
    assert pod.lacks_room(doc_b, 2)  # 10 + 10 > 15
    second.ended()
    assert pod.current_load().held_blocks == 0 and not pod.held
    assert not pod.lacks_room(doc_b, 2)


def test_a_block_twice_in_a_prompt_is_released_once():
    pod = pod_with(15)
    Sending(pod, 0, [7, 7, 8], 0).ended()  # a hash repeated (a collision): no KeyError
    assert not pod.held and pod.current_load().held_blocks == 0


def test_room_is_never_lacking_where_the_router_holds_nothing_or_the_size_is_unknown():
    too_big = list(range(40))  # more than the whole cache: vLLM's to refuse, not ours to hold
    assert not pod_with(15).lacks_room(too_big, 4)
    unknown = pod_with(0)
    Sending(unknown, 0, list(range(8)), 2)
    assert not unknown.lacks_room(list(range(100, 108)), 2)


def test_kv_aware_passes_over_a_pod_without_room_while_another_has_some():
    policy = make_policy("kv_aware", ScoringConfig())
    caches = {"a": PodCache(8, ("GPU",) * 8)}
    request = ScoreInput(8, ["a", "b"], caches, {"a": PodLoad(), "b": PodLoad()})
    assert policy.choose(request).pod == "a"  # the cached prefix wins
    full = ScoreInput(8, ["a", "b"], caches, {"a": PodLoad(), "b": PodLoad()}, frozenset("a"))
    decision = policy.choose(full)
    assert decision.pod == "b", decision.reason
    assert "skipped saturated a" in decision.reason
    # no room anywhere: the least loaded, as when every pod is saturated
    nowhere = ScoreInput(8, ["a", "b"], caches, {"a": PodLoad(), "b": PodLoad()}, frozenset("ab"))
    assert "all 2 candidates saturated" in policy.choose(nowhere).reason


def test_the_slo_planner_counts_a_pod_without_room_as_saturated():
    config = ScoringConfig()
    planner = SLOPlanner(LatencyModels(), make_policy("slo", config), config, 128, 0.1)
    request = ScoreInput(8, ["a", "b"], full=frozenset("a"))
    assert not planner.all_saturated(request)
    assert planner.all_saturated(ScoreInput(8, ["a", "b"], full=frozenset("ab")))


@pytest.fixture
def decider() -> Decider:
    pods = ["http://a:1", "http://b:2"]
    argv = ["--pod", pods[0], "--pod", pods[1], "--block-size", "128", "--kv-room"]
    config = parse_config(argv, {})
    registry = PodRegistry(config.pods, None)
    for pod in registry.pods.values():
        pod.healthy, pod.hashes_ok = True, True
        pod.load = PodLoad(kv_blocks=15)
    policy = make_policy("kv_aware", config.scoring_config())
    return Decider(config, registry, InMemoryIndex(), None, policy, RouterMetrics())


def test_a_request_counts_its_partial_block_and_its_answer(decider: Decider):
    # 1100 prompt tokens: 8 full blocks of 128 and 76 tokens; 16 answer tokens fit beside
    assert decider._own_blocks(8, 1100, {"max_tokens": 16}) == 1
    assert decider._own_blocks(8, 1100, {"max_tokens": 60}) == 2  # 136 tokens past the 8
    assert decider._own_blocks(8, 1100, {"max_completion_tokens": 200}) == 3
    assert decider._own_blocks(8, 1100, {}) == 1  # no max_tokens: the prompt alone
    assert decider._own_blocks(8, 1100, {"max_tokens": True}) == 1  # not a count
    assert decider._own_blocks(0, None, None) == 0  # not tokenized: nothing known


def test_the_decider_sends_another_document_where_there_is_room(decider: Decider):
    doc_a, doc_b = list(range(8)), list(range(100, 108))
    registry = decider.registry
    with registry.sending("http://a:1", 0, doc_a, 2):
        assert pods_without_room(registry.loads(), registry.pods, doc_b, 2) == {"http://a:1"}
        # its blocks are a's already
        assert pods_without_room(registry.loads(), registry.pods, doc_a, 2) == frozenset()
        caches = {"http://a:1": PodCache(8, ("GPU",) * 8)}  # a holds b's document too
        route = decider._route({}, doc_b, 2, caches, 1100, _plain())
        assert route.decode.pod == "http://b:2", route.decode.reason
    assert pods_without_room(registry.loads(), registry.pods, doc_b, 2) == frozenset()


def test_without_kv_room_the_decider_leaves_room_to_the_pods():
    pods = ["http://a:1", "http://b:2"]
    argv = ["--pod", pods[0], "--pod", pods[1], "--block-size", "128", "--no-kv-room"]
    config = parse_config(argv, {})
    registry = PodRegistry(config.pods, None)
    for pod in registry.pods.values():
        pod.healthy, pod.hashes_ok = True, True
        pod.load = PodLoad(kv_blocks=15)
    policy = make_policy("kv_aware", config.scoring_config())
    decider = Decider(config, registry, InMemoryIndex(), None, policy, RouterMetrics())
    with registry.sending(pods[0], 0, list(range(8)), 2):
        caches = {pods[0]: PodCache(8, ("GPU",) * 8)}
        route = decider._route({}, list(range(100, 108)), 2, caches, 1100, _plain())
        assert route.decode.pod == pods[0]  # the cached prefix, room or not


def _plain():
    from vllm_llmd.router.slo import SLO, RequestClass

    return RequestClass(SLO())


@pytest.mark.parametrize("kv_room", [True, False])
def test_a_hit_that_fits_goes_to_its_holder_whatever_the_kv_usage_gauge_reads(kv_room):
    """The audit of the shared-document workload: a pod whose KV-usage gauge read 0.97 (three
    requests of one document decoding) turned away a fourth request on that document, which
    needed one new block, and another pod computed the whole document cold. Where the router
    counts room, its own count decides; without it the gauge's threshold does."""
    pods = ["http://a:1", "http://b:2"]
    argv = ["--pod", pods[0], "--pod", pods[1], "--block-size", "128"]
    config = parse_config([*argv, "--kv-room" if kv_room else "--no-kv-room"], {})
    registry = PodRegistry(config.pods, None)
    for pod in registry.pods.values():
        pod.healthy, pod.hashes_ok = True, True
    registry.pods[pods[0]].load = PodLoad(num_running=3, kv_usage=0.97, kv_blocks=15)
    registry.pods[pods[1]].load = PodLoad(kv_blocks=15)
    policy = make_policy("kv_aware", config.scoring_config())
    decider = Decider(config, registry, InMemoryIndex(), None, policy, RouterMetrics())
    doc = list(range(8))
    caches = {pods[0]: PodCache(8, ("GPU",) * 8)}
    with registry.sending(pods[0], 0, doc, 1), registry.sending(pods[0], 0, doc, 1):
        route = decider._route({}, doc, 1, caches, 1100, _plain())
        assert route.decode.pod == (pods[0] if kv_room else pods[1]), route.decode.reason
        # another document's 8 new blocks do not fit beside the 10 held: saturated either way
        route = decider._route({}, list(range(100, 108)), 1, {}, 1100, _plain())
        assert route.decode.pod == pods[1], route.decode.reason


def test_where_the_router_holds_nothing_the_kv_usage_gauge_still_decides():
    """A pod full of another router's requests (or of ones just ended: the gauge lags) is
    saturated by its gauge: the router's count knows nothing of them."""
    full = PodLoad(kv_usage=0.97, kv_blocks=15)
    assert kv_gauge_full(full, 0.95, kv_room=True)
    assert kv_gauge_full(full, 0.95, kv_room=False)
    held = PodLoad(kv_usage=0.97, kv_blocks=15, held_blocks=10)
    assert not kv_gauge_full(held, 0.95, kv_room=True)  # its count decides (ScoreInput.full)
    assert kv_gauge_full(held, 0.95, kv_room=False)
    unknown_size = PodLoad(kv_usage=0.97, held_blocks=10)
    assert kv_gauge_full(unknown_size, 0.95, kv_room=True)
    assert not kv_gauge_full(PodLoad(kv_usage=0.5), 0.95, kv_room=False)
    # the policies read it so: a request may go to the held pod, not the one full of others
    policy = make_policy("kv_aware")
    loads = {"a": held, "b": full}
    request = ScoreInput(8, ["a", "b"], {"b": PodCache(8, ("GPU",) * 8)}, loads, kv_room=True)
    assert policy.choose(request).pod == "a"
    planner = SLOPlanner(LatencyModels(), policy, ScoringConfig(), 128, 0.1)
    assert not planner.all_saturated(request)
    assert planner.all_saturated(ScoreInput(8, ["a", "b"], {}, loads, frozenset("a"), True))
