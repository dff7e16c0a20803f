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


def _pull(caches: dict, loads: dict, latency: LatencyModels | None = None):
    """A request of 8 blocks routed with --pull-from-holders over pods A and B (both roles)."""
    how = RoutingPolicy(
        make_policy("kv_aware"),
        None,
        latency or LatencyModels(8),
        BLOCK,
        64,
        pull_from_holders=True,
        holder_max_waiting=16,
    )
    return decide_route(
        how, "req-1", 8, 8 * BLOCK, RequestClass(SLO()), [A, B], [], caches, loads, None, [A, B]
    )


def test_a_busy_holder_of_the_prefix_becomes_the_kv_source_of_the_pod_chosen_for_load():
    caches = {A: PodCache(8, ("GPU",) * 8)}
    busy_a = {A: PodLoad(num_waiting=9, num_running=8), B: PodLoad()}
    route = _pull(caches, busy_a)
    assert route.decode.pod == B  # A is saturated for the policy (8 waiting or more)
    assert route.prefill is not None and route.prefill.pod == A
    assert route.prefill.reason.startswith(f"KV source: holds 8 more blocks of the prompt than {B}")
    # too little to gain (4 blocks = 64 tokens, not more than the threshold): B computes it
    few = _pull({A: PodCache(4, ("GPU",) * 4)}, busy_a)
    assert few.decode.pod == B and few.prefill is None
    # a holder with a queue too long (16) is no source
    saturated = {A: PodLoad(num_waiting=16, num_running=8), B: PodLoad()}
    assert _pull(caches, saturated).prefill is None
    # when the pod holding it is also the one chosen, nothing moves
    assert _pull(caches, LOADS).decode.pod == A and _pull(caches, LOADS).prefill is None


def test_warm_latency_models_keep_the_work_on_the_decode_pod_when_a_pull_is_slower():
    latency = LatencyModels(1)
    caches = {A: PodCache(8, ("GPU",) * 8)}
    busy_a = {A: PodLoad(num_waiting=9, num_running=8), B: PodLoad()}
    route = _pull(caches, busy_a, latency)
    assert route.prefill is not None
    # teach the models: A's prefill and B's decode after a pull take 2 s, B alone 0.1 s
    for _ in range(20):
        latency.observe(A, "prefill", route.prefill_shape, 1.0, None)
        latency.observe(B, "decode", route.shape.after_prefill(1.0), 1.0, None)
        latency.observe(B, "direct", route.shape, 0.1, None)
    assert _pull(caches, busy_a, latency).prefill is None


def test_warm_models_decide_pd_by_predicted_cost_instead_of_the_threshold():
    latency = LatencyModels(1)
    how = RoutingPolicy(make_policy("kv_aware"), None, latency, BLOCK, 64)

    def route(num_blocks: int):
        return decide_route(
            how, "r", num_blocks, num_blocks * BLOCK, RequestClass(SLO()), [A], [P], {}, LOADS
        )

    cold_long, cold_short = route(8), route(2)  # 128 uncached tokens > 64; 32 < 64
    assert cold_long.prefill is not None and cold_short.prefill is None
    # teach: computing here costs 0.5 s per 1k tokens; the P/D step and the decode after the
    # transfer 5 ms each, whatever the prompt
    for blocks in range(1, 40):
        shape = route(blocks).shape
        latency.observe(A, "direct", shape, 0.5 * blocks * BLOCK / 1000, None)
        latency.observe(A, "decode", shape.after_prefill(0.005), 0.005, None)
        latency.observe(P, "prefill", shape, 0.005, None)
    short = route(2)  # 32 tokens: 16 ms here against 10 ms through P/D
    assert short.prefill is not None and short.prefill.pod == P
    assert "P/D predicted" in short.prefill.reason
    # P/D that is slow to come back loses to a short local prefill
    for blocks in range(1, 40):
        latency.observe(P, "prefill", route(blocks).shape, 2.0, None)
    assert route(2).prefill is None
    # a prompt longer than any seen (39 blocks) is an extrapolation: the threshold decides
    assert route(60).prefill is not None and "predicted" not in route(60).prefill.reason


def test_a_long_prompt_goes_pd_when_requests_arriving_would_wait_behind_it():
    """P/D that is no faster for the request itself (0.1 s more) is taken when the decode pod
    is busy with arrivals: the short prompts that would queue behind a 1.5 s local prefill
    would wait out most of it, and on the prefill pod nobody queues behind it."""
    latency = LatencyModels(1)
    how = RoutingPolicy(make_policy("kv_aware"), None, latency, BLOCK, 1 << 30)

    def route(num_blocks: int, decode_rate: float):
        loads = {A: PodLoad(arrival_rate=decode_rate), P: PodLoad()}
        return decide_route(
            how, "r", num_blocks, num_blocks * BLOCK, RequestClass(SLO()), [A], [P], {}, loads
        )

    # teach: 1 s per 1k uncached tokens on either pod; the decode after the transfer 0.1 s
    for blocks in range(1, 100):
        shape = route(blocks, 0.0).shape
        latency.observe(A, "direct", shape, blocks * BLOCK / 1000, None)
        latency.observe(P, "prefill", shape, blocks * BLOCK / 1000, None)
        latency.observe(A, "decode", shape.after_prefill(blocks * BLOCK / 1000), 0.1, None)
    assert route(94, 0.0).prefill is None  # 1.5 s here against 1.6 s through P/D
    busy = route(94, 2.0)  # two requests a second reach the decode pod
    assert busy.prefill is not None and busy.prefill.pod == P
    assert "P/D predicted to cost" in busy.prefill.reason
    # a short prompt holds back little: it stays however busy the pod is
    assert route(4, 2.0).prefill is None


def test_pd_is_judged_by_its_mean_not_its_typical_answer():
    """A P/D decode that answers in 40 ms four times in five and in 1.5 s the fifth (its pull
    starved by the prefill pod's next prompt) costs 0.33 s on average. The fit of relative
    errors predicts the typical 40 ms, by which P/D (0.6 + 0.04 s) beat computing alone
    (0.7 s); by the mean it does not (0.93 s). Without the tail it still does."""
    latency = LatencyModels(1)
    how = RoutingPolicy(make_policy("kv_aware"), None, latency, BLOCK, 1 << 30)

    def route():
        return decide_route(how, "r", 94, 94 * BLOCK, RequestClass(SLO()), [A], [P], {}, LOADS)

    def teach(tail_s: float) -> None:
        for i in range(100):
            shape = route().shape
            latency.observe(A, "direct", shape, 0.7, None)
            latency.observe(P, "prefill", shape, 0.6, None)
            decode_s = tail_s if i % 5 == 4 else 0.04
            latency.observe(A, "decode", shape.after_prefill(0.6), decode_s, None)

    teach(1.5)
    decode_shape = route().shape.after_prefill(0.6)
    assert latency.predict(A, "decode", decode_shape).ttft_s < 0.1  # the typical answer
    assert latency.mean_ttft_s(A, "decode", decode_shape) > 0.25  # with its tail
    assert route().prefill is None
    teach(0.04)  # the tail is gone: the mean follows within the forgetting horizon
    chosen = route().prefill
    assert chosen is not None and chosen.pod == P and "P/D predicted to cost" in chosen.reason


def _taught_with_work_ahead(decodes_behind: bool):
    """Decode pod A and prefill pod P, taught as the dispatcher teaches: 1 s per 1k tokens
    computed on either pod, with 0 to 1500 tokens ahead on A; a decode after the transfer takes
    0.1 s plus what is left ahead of it when it arrives, seen with work ahead of it
    (`decodes_behind`) or only with none. Returns the models and route(blocks, ahead): a
    prompt of that many blocks with `ahead` tokens just started on A."""
    latency = LatencyModels(1)
    how = RoutingPolicy(make_policy("kv_aware"), None, latency, BLOCK, 1 << 30)

    def route(num_blocks: int, ahead: int):
        loads = {A: PodLoad(prefill_tokens=ahead, prefill_elapsed_s=0.001), P: PodLoad()}
        return decide_route(
            how, "r", num_blocks, num_blocks * BLOCK, RequestClass(SLO()), [A], [P], {}, loads
        )

    for blocks in range(2, 100):
        prefill_s = blocks * BLOCK / 1000
        for ahead in (0, 500, 1000, 1500):
            r = route(blocks, ahead)
            latency.observe(A, "direct", r.shape, (blocks * BLOCK + ahead) / 1000, None)
            latency.observe(P, "prefill", r.prefill_shape or r.shape, prefill_s, None)
            if decodes_behind or ahead == 0:
                decode_s = 0.1 + max(0.0, ahead / 1000 - prefill_s)
                latency.observe(A, "decode", r.shape.after_prefill(prefill_s), decode_s, None)
    return latency, route


def test_a_pd_decode_is_costed_behind_what_is_still_ahead_of_it_when_the_prefill_is_done():
    """A decode request reaches its pod once the prefill is done. Behind a 1.5 s prompt just
    started on the decode pod, a long prompt's P/D decode finds it done (its own 1.5 s prefill
    ran meanwhile on the prefill pod), while a short prompt's would wait out nearly all of it:
    P/D pays for the long prompt only. Costed with the decode pod as it is at dispatch, the
    long prompt's decode was charged the whole 1.5 s too."""
    _, route = _taught_with_work_ahead(decodes_behind=True)
    long_behind = route(94, 1500).prefill  # 1.5 s ahead + 1.5 s here, or 1.5 s + 0.1 s
    assert long_behind is not None and long_behind.pod == P
    assert "P/D predicted to cost" in long_behind.reason
    # 64 tokens: 1.5 s ahead + 64 ms here, or 64 ms + 1.44 s still ahead + 0.1 s
    assert route(4, 1500).prefill is None


def test_a_pd_decode_waits_behind_the_work_ahead_at_the_direct_cost_until_seen_otherwise():
    """Most P/D decodes are of long prompts, which reach the decode pod once the work ahead
    there is done: the decode mode alone never learns what a token ahead costs. Its prior is
    the direct mode's fit, which does: a short prompt behind a long one just started there is
    costed with that wait and stays, where a decode fit of its own said 0.1 s."""
    latency, route = _taught_with_work_ahead(decodes_behind=False)
    behind = route(4, 1500)  # 64 tokens behind 1.5 s of work just started
    assert behind.prefill is None, behind.prefill.reason if behind.prefill else None
    decode_shape = behind.shape.after_prefill(0.064)
    assert latency.predict(A, "decode", decode_shape).ttft_s > 1.3  # 0.1 s + ~1.44 s ahead
    # a long prompt's decode finds that work done: P/D (1.5 + 0.1 s) against 3 s here
    long_behind = route(94, 1500).prefill
    assert long_behind is not None and long_behind.pod == P


def test_a_prompt_shorter_than_any_seen_is_left_to_the_threshold():
    """A fit of long prompts only says little of short ones (their fixed costs hide in its
    per-token term): below the shortest prompt seen, as above the longest, the threshold
    decides."""
    latency = LatencyModels(1)
    how = RoutingPolicy(make_policy("kv_aware"), None, latency, BLOCK, 64)

    def route(num_blocks: int):
        return decide_route(
            how, "r", num_blocks, num_blocks * BLOCK, RequestClass(SLO()), [A], [P], {}, LOADS
        )

    for blocks in range(50, 100):  # P/D 2 ms, alone 1 s per 1k tokens
        shape = route(blocks).shape
        latency.observe(A, "direct", shape, blocks * BLOCK / 1000, None)
        latency.observe(A, "decode", shape.after_prefill(0.001), 0.001, None)
        latency.observe(P, "prefill", shape, 0.001, None)
    seen = route(60).prefill
    assert seen is not None and "P/D predicted to cost" in seen.reason
    assert route(2).prefill is None  # 32 tokens, not above the threshold of 64
