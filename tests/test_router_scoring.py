"""Routing policies: each rule, saturation, tier weights, tie-breaks and the reasons they give."""

from __future__ import annotations

import random

import pytest

from vllm_llmd.router.load import PodLoad
from vllm_llmd.router.scoring import (
    Decision,
    KVAwarePolicy,
    PodCache,
    PolicyName,
    ScoreInput,
    ScoringConfig,
    load_key,
    make_policy,
    prefix_score,
)


def cached(*tiers: str) -> PodCache:
    return PodCache(len(tiers), tuple(tiers))


def gpu(n: int) -> PodCache:
    return cached(*["GPU"] * n)


def choose(policy: str, num_blocks=8, candidates=("a", "b", "c"), caches=None, loads=None, **cfg):
    request = ScoreInput(num_blocks, list(candidates), caches or {}, loads or {})
    return make_policy(policy, ScoringConfig(**cfg)).choose(request)


# ---- factory and inputs -------------------------------------------------------------------


def test_factory_builds_each_policy_by_name_and_enum():
    for name in PolicyName:
        assert make_policy(name).name == name.value
        assert make_policy(name.value).name == name.value
    assert make_policy().name == "kv_aware"
    with pytest.raises(ValueError, match=r"unknown routing policy 'fastest'.*kv_aware"):
        make_policy("fastest")


def test_inputs_are_validated():
    with pytest.raises(ValueError, match="no candidate"):
        ScoreInput(4, [])
    with pytest.raises(ValueError, match="3 cached blocks but 2 tiers"):
        PodCache(3, ("GPU", "GPU"))
    with pytest.raises(ValueError, match="kv_usage"):
        PodLoad(kv_usage=1.5)
    with pytest.raises(ValueError, match="tier weights"):
        ScoringConfig(tier_weights={"GPU": -1.0})
    with pytest.raises(ValueError, match="max_kv_usage"):
        ScoringConfig(max_kv_usage=0.0)


def test_config_weights_cannot_change_behind_its_back():
    weights = {"GPU": 1.0}
    config = ScoringConfig(tier_weights=weights)
    weights["GPU"] = 0.0
    assert config.tier_weights["GPU"] == 1.0
    with pytest.raises(TypeError):
        config.tier_weights["GPU"] = 0.5  # type: ignore[index]


# ---- round robin --------------------------------------------------------------------------


def test_round_robin_cycles_in_pod_id_order_whatever_the_input_order():
    policy = make_policy("round_robin")
    picks = [policy.choose(ScoreInput(4, ["c", "a", "b"])).pod for _ in range(5)]
    assert picks == ["a", "b", "c", "a", "b"]


def test_round_robin_continues_after_the_last_pick_when_candidates_change():
    policy = make_policy("round_robin")
    assert policy.choose(ScoreInput(0, ["a", "b", "c"])).pod == "a"
    assert policy.choose(ScoreInput(0, ["a", "c"])).pod == "c"  # b is gone: next after a
    decision = policy.choose(ScoreInput(0, ["a", "b"], {"a": gpu(2)}))
    assert decision == Decision("a", "round robin", {"a": 1.0, "b": 0.0}, 2)


# ---- least loaded -------------------------------------------------------------------------


def test_load_compares_waiting_first_then_active_then_kv_usage():
    loads = {
        "a": PodLoad(num_waiting=1),
        "b": PodLoad(num_running=5, kv_usage=0.1),
        "c": PodLoad(num_running=2, num_in_flight=3, kv_usage=0.05),
    }
    decision = choose("load", loads=loads)
    assert decision.pod == "c"  # b and c both have 5 active; c uses less KV
    assert decision.scores == {"c": 0.0, "b": -1.0, "a": -2.0}
    assert decision.reason == "least loaded: waiting=0 running=2 in_flight=3 kv=0.05"
    assert load_key(loads["a"]) > load_key(loads["b"])  # any waiting beats any running


def test_in_flight_counts_like_running():
    loads = {"a": PodLoad(num_running=1), "b": PodLoad(num_in_flight=2)}
    assert choose("load", candidates=("a", "b"), loads=loads).pod == "a"


def test_load_ties_go_to_the_smallest_pod_id_and_unknown_load_is_idle():
    assert choose("load", candidates=("b", "a")).pod == "a"
    loads = {"a": PodLoad(num_running=1)}  # b was never scraped
    assert choose("load", candidates=("a", "b"), loads=loads).pod == "b"


# ---- prefix -------------------------------------------------------------------------------


def test_prefix_score_weights_each_block_by_its_tier():
    weights = ScoringConfig().tier_weights
    assert prefix_score(gpu(4), 8, weights) == 0.5
    assert prefix_score(cached("GPU", "CPU", "STORAGE", "NVME"), 4, weights) == pytest.approx(
        (1.0 + 0.8 + 0.5 + 0.0) / 4
    )
    assert prefix_score(gpu(4), 0, weights) == 0.0
    assert prefix_score(gpu(9), 8, weights) == 1.0  # never more than the request


def test_prefix_picks_the_longest_weighted_prefix_and_explains_it():
    caches = {"a": gpu(3), "b": cached("GPU", "CPU", "CPU", "CPU", "STORAGE"), "c": gpu(2)}
    decision = choose("prefix", num_blocks=8, caches=caches)
    assert decision.pod == "b"  # 1 + 3*0.8 + 0.5 = 3.9 > 3
    assert decision.hit_blocks == 5
    assert decision.scores == pytest.approx({"a": 3 / 8, "b": 3.9 / 8, "c": 2 / 8})
    assert decision.reason == (
        "longest prefix: 5/8 blocks cached (GPU 1, CPU 3, STORAGE 1), score 0.488"
    )


def test_tier_weights_are_configurable():
    caches = {"a": gpu(2), "b": cached(*["CPU"] * 3)}
    assert choose("prefix", candidates=("a", "b"), caches=caches).pod == "b"  # 2.4 > 2
    low_cpu = {"GPU": 1.0, "CPU": 0.5}
    assert choose("prefix", candidates="ab", caches=caches, tier_weights=low_cpu).pod == "a"


def test_prefix_ties_go_to_the_less_loaded_pod_then_the_smallest_id():
    caches = {"a": gpu(4), "b": gpu(4)}
    loads = {"a": PodLoad(num_running=3), "b": PodLoad(num_running=1)}
    assert choose("prefix", caches=caches, loads=loads).pod == "b"
    assert choose("prefix", caches=caches).pod == "a"
    # nothing cached anywhere: least loaded
    assert choose("prefix", candidates="ab", loads=loads).pod == "b"


# ---- kv_aware -----------------------------------------------------------------------------


def test_kv_aware_follows_the_cache_when_load_is_comparable():
    caches = {"a": gpu(8)}
    loads = {"a": PodLoad(num_running=2), "b": PodLoad(num_running=1), "c": PodLoad()}
    decision = choose("kv_aware", caches=caches, loads=loads)
    assert decision.pod == "a"
    assert decision.hit_blocks == 8
    # a: 1.0 - 0.5 * 2/4; b: -0.5 * 1/4; c: 0
    assert decision.scores == pytest.approx({"a": 0.75, "b": -0.125, "c": 0.0})
    assert decision.reason == "kv_aware: 8/8 blocks cached (GPU 8), load 0.50, score 0.750"


def test_kv_aware_trades_a_short_prefix_for_an_idle_pod():
    caches = {"a": gpu(1)}  # 1/8 of the request
    loads = {"a": PodLoad(num_running=4), "b": PodLoad()}
    decision = choose("kv_aware", candidates="ab", caches=caches, loads=loads)
    assert decision.pod == "b"
    assert decision.scores["a"] == pytest.approx(0.125 - 0.5)
    assert decision.hit_blocks == 0


def test_kv_aware_load_uses_kv_usage_when_it_is_the_larger_signal():
    policy = KVAwarePolicy(ScoringConfig())
    loads = {"a": PodLoad(num_running=1, kv_usage=0.9), "b": PodLoad(num_running=8)}
    request = ScoreInput(4, ["a", "b"], loads=loads)
    assert policy.load_scores(request) == pytest.approx({"a": 0.9, "b": 1.0})
    # the floor: one request against none is a quarter load, not a full one
    request = ScoreInput(4, ["a", "b"], loads={"a": PodLoad(num_in_flight=1)})
    assert policy.load_scores(request) == {"a": 0.25, "b": 0.0}


@pytest.mark.parametrize(
    "hot_load",
    [PodLoad(num_waiting=8), PodLoad(kv_usage=0.95)],
    ids=["waiting", "kv_usage"],
)
def test_kv_aware_never_sends_cache_affinity_to_a_saturated_pod(hot_load):
    caches = {"a": gpu(8)}
    loads = {"a": hot_load, "b": PodLoad(num_running=3, kv_usage=0.5)}
    decision = choose("kv_aware", candidates="ab", caches=caches, loads=loads, w_load=0.0)
    assert decision.pod == "b"
    assert decision.scores["a"] > decision.scores["b"]  # a would have won on score alone
    assert decision.reason.endswith("; skipped saturated a")


def test_kv_aware_saturation_thresholds_are_configurable():
    caches = {"a": gpu(8)}
    loads = {"a": PodLoad(num_waiting=8), "b": PodLoad()}
    decision = choose("kv_aware", candidates="ab", caches=caches, loads=loads, max_waiting=16)
    assert decision.pod == "a"


def test_kv_aware_all_saturated_falls_back_to_least_loaded():
    caches = {"a": gpu(8), "b": gpu(4)}
    loads = {
        "a": PodLoad(num_waiting=12, kv_usage=0.99),
        "b": PodLoad(num_waiting=9, num_running=4, kv_usage=0.97),
        "c": PodLoad(num_waiting=9, num_running=2, kv_usage=0.99),
    }
    decision = choose("kv_aware", caches=caches, loads=loads)
    assert decision.pod == "c"
    assert decision.hit_blocks == 0
    assert decision.reason == (
        "all 3 candidates saturated; least loaded: waiting=9 running=2 in_flight=0 kv=0.99"
    )
    assert set(decision.scores) == {"a", "b", "c"}


def test_kv_aware_is_deterministic_on_ties():
    # equal cache and load on every pod: the smallest id, whatever the order given
    caches = {p: gpu(4) for p in "abc"}
    assert {
        choose("kv_aware", candidates=order, caches=caches).pod for order in ("cab", "bca")
    } == {"a"}
    # equal score, different load shape: the least-loaded order decides
    loads = {"a": PodLoad(num_waiting=1), "b": PodLoad(num_running=1)}
    assert choose("kv_aware", candidates="ab", loads=loads).pod == "b"


def test_kv_aware_with_an_empty_request_is_pure_load():
    loads = {"a": PodLoad(num_running=2), "b": PodLoad(num_running=1)}
    decision = choose(
        "kv_aware", num_blocks=0, candidates="ab", caches={"a": PodCache()}, loads=loads
    )
    assert decision.pod == "b"
    assert decision.reason.startswith("kv_aware: 0/0 blocks cached, load 0.25")


def test_candidate_loads_are_each_candidates_in_order_idle_when_unscraped():
    busy = PodLoad(num_waiting=2)
    request = ScoreInput(4, ["b", "a", "c"], loads={"a": busy, "zz": busy})
    loads = request.candidate_loads()
    assert list(loads) == ["b", "a", "c"]
    assert loads == {"b": PodLoad(), "a": busy, "c": PodLoad()}


@pytest.mark.parametrize("seed", range(5))
def test_kv_aware_decides_as_its_definition_says(seed):
    # the policy is written for speed at 256 pods; this is its rule written plainly, checked
    # on random clusters (cached or not, saturated or not, unscraped pods)
    rng = random.Random(seed)
    config = ScoringConfig(w_load=rng.choice([0.0, 0.5, 2.0]), max_waiting=rng.choice([1, 8]))
    policy = KVAwarePolicy(config)
    for _ in range(50):
        pods = [f"pod-{i:02d}" for i in rng.sample(range(40), rng.randint(1, 40))]
        num_blocks = rng.randint(0, 12)
        caches = {
            p: cached(*rng.choices(["GPU", "CPU", "STORAGE", "SHARED"], k=rng.randint(0, 14)))
            for p in rng.sample(pods, rng.randint(0, len(pods)))
        }
        loads = {
            p: PodLoad(rng.randint(0, 9), rng.randint(0, 9), rng.choice([0.2, 0.96, rng.random()]))
            for p in pods
            if rng.random() < 0.9
        }
        request = ScoreInput(num_blocks, pods, caches, loads)
        decision = policy.choose(request)

        load = policy.load_scores(request)
        pressure = {p: sum(_counts(request.load(p))) for p in pods}
        scale = max(config.pressure_floor, *pressure.values())
        assert load == {p: max(request.load(p).kv_usage, pressure[p] / scale) for p in pods}
        scores = {
            p: config.w_prefix * prefix_score(request.cache(p), num_blocks, config.tier_weights)
            - config.w_load * load[p]
            for p in pods
        }
        assert decision.scores == scores
        assert list(decision.scores) == pods
        free = [p for p in pods if not policy.is_saturated(request.load(p))]
        by_load = {p: (load_key(request.load(p)), p) for p in pods}
        if not free:  # all saturated: the least loaded
            assert decision.pod == min(pods, key=by_load.__getitem__)
            continue
        best = max(scores[p] for p in free)
        tied = [p for p in free if scores[p] == best]
        assert decision.pod == min(tied, key=by_load.__getitem__)
        skipped = sorted(p for p in pods if p not in free and scores[p] > best)
        assert decision.reason.endswith(f"; skipped saturated {', '.join(skipped)}") == bool(
            skipped
        )
        assert decision.hit_blocks == request.cache(decision.pod).num_blocks


def _counts(load: PodLoad) -> tuple[int, int, int]:
    return (load.num_waiting, load.num_running, load.num_in_flight)
