"""The cluster simulator (vllm_llmd.sim): its pods' caches and events, the router's real code
in the loop, the workloads, and (server) calibration against a real vLLM."""

from __future__ import annotations

import dataclasses
import gc
import json
from pathlib import Path

import pytest
import simpy

from vllm_llmd.devtools.client import StreamTiming, timed_stream
from vllm_llmd.devtools.server import VLLMServerConfig
from vllm_llmd.events.model import MEDIUM_GPU, BlockRemoved, BlockStored, EventBatch
from vllm_llmd.hashing import PrefixHasher
from vllm_llmd.router import routing
from vllm_llmd.router.load import PodLoad
from vllm_llmd.router.slo import SLO
from vllm_llmd.sim import cli, workloads
from vllm_llmd.sim.cache import Hit, PrefixCache
from vllm_llmd.sim.calibrate import decoding_tpot
from vllm_llmd.sim.metrics import table
from vllm_llmd.sim.pod import Outcome, PodConfig, SimPod
from vllm_llmd.sim.profile import H100_LLAMA_8B, LatencyProfile, load_profile, save_profile
from vllm_llmd.sim.router import RouterSettings, SimRouter
from vllm_llmd.sim.run import SimConfig, simulate
from vllm_llmd.sim.workloads import (
    Chain,
    ChatShape,
    SharedPrefixShape,
    SimRequest,
    mooncake_trace,
    shared_prefix,
    synthetic_tokens,
)

BLOCK = 64


def _stored(events) -> list[int]:
    return [h for e in events if isinstance(e, BlockStored) for h in e.block_hashes]


def _removed(events) -> list[int]:
    return [h for e in events if isinstance(e, BlockRemoved) for h in e.block_hashes]


def test_cache_evicts_the_least_recently_freed_blocks_tail_first_and_says_so():
    cache = PrefixCache(capacity_blocks=4, block_size=4)
    for hashes in ([1, 2], [3, 4]):
        holding = cache.allocate(hashes, 2, cache.hit(hashes))
        cache.cache(holding, hashes)
        cache.free(holding)
    assert _stored(cache.take_events()) == [1, 2, 3, 4]
    assert cache.hit([3, 4]) == Hit(2, 0)
    # [3, 4] used again: [1, 2] is now the least recently freed, and goes first, tail first
    held = cache.allocate([3, 4], 2, cache.hit([3, 4]))
    new = cache.allocate([5], 1, cache.hit([5]))
    assert _removed(cache.take_events()) == [2]
    cache.cache(new, [5])
    cache.free(new)
    cache.free(held)
    assert cache.hit([1, 2]) == Hit(1, 0)
    assert cache.usage == 0.0


def test_an_evicted_block_lives_on_in_the_host_tier():
    cache = PrefixCache(capacity_blocks=2, block_size=4, host_capacity_blocks=8)
    first = cache.allocate([1, 2], 2, cache.hit([1, 2]))
    cache.cache(first, [1, 2])
    cache.free(first)
    cache.free(cache.allocate([3, 4], 2, cache.hit([3, 4])))  # evicts 1 and 2 to the host
    events = cache.take_events()
    assert [(type(e).__name__, e.medium) for e in events] == [
        ("BlockStored", "GPU"),
        ("BlockRemoved", "GPU"),
        ("BlockStored", "CPU"),
    ]
    assert cache.hit([1, 2]) == Hit(0, 2)


def test_a_pod_publishes_its_blocks_and_the_router_index_follows_with_the_delay():
    env = simpy.Environment()
    hasher = PrefixHasher(BLOCK)
    config = PodConfig(capacity_blocks=6, block_size=BLOCK)
    router = SimRouter(RouterSettings(), ["pod-a"], BLOCK, lambda: env.now)
    batches: list[EventBatch] = []
    outcomes: list[Outcome] = []

    def publish(pod: str, batch: EventBatch) -> None:
        batches.append(batch)
        env.timeout(0.05).callbacks.append(lambda _: router.ingest(pod, batch))

    pod = SimPod(env, "pod-a", config, H100_LLAMA_8B, publish, outcomes.append)
    requests = []
    for i in range(3):  # three prompts of 4 blocks (and a token) in a 6-block pod: evictions
        chain = Chain(hasher)
        chain.extend(synthetic_tokens(i, 4 * BLOCK + 1))
        requests.append(SimRequest(i, i * 2.0, chain.num_tokens, 4, chain.hashes))
        env.process(_submit_at(env, pod, requests[-1]))
    env.run(until=1.0)
    first = requests[0].prompt_hashes[:4]
    assert router.index.lookup_prefix(first)["pod-a"].num_blocks == 4
    env.run()
    assert len(outcomes) == 3 and all(o.ttft_s > 0 for o in outcomes)
    events = [e for b in batches for e in b.events]
    assert set(first) <= set(_removed(events))
    assert "pod-a" not in router.index.lookup_prefix(first)
    last = requests[2].prompt_hashes
    assert router.index.lookup_prefix(last)["pod-a"].num_blocks == len(last)
    assert router.event_stats["pod-a"].num_batches == len(batches)  # via ingest.apply_update
    assert all(e.medium == MEDIUM_GPU for e in events)


def _submit_at(env, pod, request):
    yield env.timeout(request.arrival_s)
    pod.submit(request)


def _llmd(num_requests: int, rate: float, seed: int = 0):
    shape = SharedPrefixShape(num_groups=50)
    return list(shared_prefix(PrefixHasher(BLOCK), num_requests, rate, shape, seed))


def test_prefix_aware_policies_beat_round_robin_on_the_llmd_shaped_workload():
    requests = _llmd(2000, rate=8 * 4.0)
    # each pod holds ~16 of the 50 prefixes: round robin thrashes, affinity does not
    pod = PodConfig(capacity_blocks=1500)
    summaries = {
        policy: simulate(
            SimConfig(8, pod, router=RouterSettings(policy=policy)), iter(requests)
        ).summary
        for policy in ("round_robin", "prefix", "kv_aware")
    }
    baseline = summaries["round_robin"]
    assert baseline.num_requests == 2000
    for policy in ("prefix", "kv_aware"):
        mine = summaries[policy]
        assert mine.ttft_s[1] * 3 < baseline.ttft_s[1], (policy, mine, baseline)
        assert mine.hit_rate > baseline.hit_rate + 0.3, (policy, mine, baseline)
        assert mine.good_share >= baseline.good_share


def test_the_simulator_routes_through_the_routers_own_decide_route(monkeypatch):
    calls = []
    real = routing.decide_route

    def counted(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(routing, "decide_route", counted)
    result = simulate(SimConfig(4), iter(_llmd(100, rate=20.0)))
    # every request decided, a request held by prefill pacing again when it goes
    assert sorted(set(map(int, calls))) == list(range(100))
    assert result.summary.num_requests == 100
    assert result.router.index.stats().num_blocks > 0


def test_a_run_collects_garbage_rarely_and_restores_the_collectors_thresholds(monkeypatch):
    # a large run's heap is rescanned by the collector at the default thresholds: a run raises
    # the young generation's, and leaves the process's settings as it found them
    seen = []
    real = routing.decide_route

    def spy(*args, **kwargs):
        seen.append(gc.get_threshold()[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(routing, "decide_route", spy)
    before = gc.get_threshold()
    simulate(SimConfig(2), iter(_llmd(20, rate=10.0)))
    assert gc.get_threshold() == before
    assert seen and all(threshold >= 100_000 for threshold in seen)


def test_a_mooncake_trace_is_read_and_simulated(tmp_path: Path):
    trace = tmp_path / "trace.jsonl"
    lines = []
    for i in range(120):
        shared = [0, 1, 2] if i % 2 else [10, 11]  # two families of shared prefixes
        lines.append(
            {
                "timestamp": i * 50,
                "input_length": 512 * (len(shared) + 1) - 100,
                "output_length": 20,
                "hash_ids": [*shared, 1000 + i],
            }
        )
    trace.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    hasher = PrefixHasher(BLOCK)
    requests = list(mooncake_trace(trace, hasher))
    assert [r.arrival_s for r in requests[:3]] == [0.0, 0.05, 0.1]
    one, three = requests[1], requests[3]
    # hash ids 0, 1, 2 are 24 blocks of 64; the unique fourth id adds 6 full blocks
    assert one.prompt_hashes[:24] == three.prompt_hashes[:24]
    assert one.prompt_hashes[24] != three.prompt_hashes[24]
    assert len(one.prompt_hashes) == 24 + (512 - 100) // BLOCK
    result = simulate(SimConfig(4, router=RouterSettings(policy="kv_aware")), iter(requests))
    assert result.summary.num_requests == 120
    assert result.summary.hit_rate > 0.5


def test_chat_turns_extend_the_conversation_and_reuse_the_answers_blocks():
    hasher = PrefixHasher(BLOCK)
    shape = ChatShape(turns=3, num_system_prompts=2, think_s=5.0)
    requests = list(workloads.multi_turn(hasher, 60, rate=6.0, shape=shape, seed=2))
    assert [r.arrival_s for r in requests] == sorted(r.arrival_s for r in requests)
    by_prompt = {tuple(r.prompt_hashes): r for r in requests}
    extended = 0
    for request in requests:
        before = tuple(request.prompt_hashes + request.output_hashes)
        later = [r for p, r in by_prompt.items() if p[: len(before)] == before and r is not request]
        extended += bool(later)
    assert extended >= 30  # every turn but the last of each conversation
    summaries = {
        policy: simulate(SimConfig(4, router=RouterSettings(policy=policy)), iter(requests)).summary
        for policy in ("round_robin", "kv_aware")
    }
    assert summaries["kv_aware"].hit_rate > summaries["round_robin"].hit_rate


def test_a_closed_loop_turn_is_sent_its_think_time_after_the_answer_it_follows():
    hasher = PrefixHasher(BLOCK)
    shape = ChatShape(turns=3, num_system_prompts=2, think_s=2.0, closed_loop=True)
    requests = list(workloads.multi_turn(hasher, 30, rate=3.0, shape=shape, seed=4))
    followed = {r.after: r for r in requests if r.after is not None}
    assert len(followed) == 20  # every turn but a conversation's first
    assert all(1.0 <= r.think_s <= 3.0 for r in followed.values())
    # a slow pod (one, a 50 ms step floor) makes the answers end late: the next turns wait
    slow = LatencyProfile(0.05, 1e-4, 0.0, 1e-3, 0.0)
    result = simulate(SimConfig(1, profile=slow), iter(requests))
    assert len(result.outcomes) == 30
    by_id = {o.request_id: o for o in result.outcomes}
    for before_id, request in followed.items():
        before, turn = by_id[before_id], by_id[request.request_id]
        ended = before.arrival_s + before.ttft_s + before.tpot_s * (shape.output_tokens - 1)
        assert turn.arrival_s == pytest.approx(ended + request.think_s, abs=1e-6)
    # open loop, the same turns come at their fixed times however slow the pod
    open_loop = dataclasses.replace(shape, closed_loop=False)
    fixed = list(workloads.multi_turn(hasher, 30, rate=3.0, shape=open_loop, seed=4))
    assert all(r.after is None for r in fixed)
    result = simulate(SimConfig(1, profile=slow), iter(fixed))
    assert sorted(o.arrival_s for o in result.outcomes) == [r.arrival_s for r in fixed]


def test_a_closed_loop_request_must_follow_one_in_flight_or_waiting():
    hasher = PrefixHasher(BLOCK)
    tokens = Chain(hasher).extend(synthetic_tokens(1, 128))
    first = SimRequest(0, 0.0, 128, 4, tokens)
    stray = SimRequest(1, 0.0, 128, 4, tokens, after=7)
    with pytest.raises(ValueError, match="request 1 follows request 7"):
        simulate(SimConfig(1), iter([first, stray]))
    twice = [first, SimRequest(1, 0.0, 128, 4, tokens, after=0)]
    twice.append(SimRequest(2, 0.0, 128, 4, tokens, after=0))
    with pytest.raises(ValueError, match="followed twice"):
        simulate(SimConfig(1), iter(twice))


def test_a_host_tier_hit_waits_out_the_step_its_load_runs_in():
    """vLLM loads a connector's KV asynchronously: the request sits out the step its blocks
    load in and prefills its last token in the next one, so a host hit costs two steps where
    a device hit costs one."""
    hasher = PrefixHasher(BLOCK)
    prompt = Chain(hasher).extend(synthetic_tokens(1, 640))
    other = Chain(hasher).extend(synthetic_tokens(2, 640))
    requests = [
        SimRequest(0, 0.0, 640, 1, prompt),
        SimRequest(1, 10.0, 640, 1, prompt),  # a device hit
        SimRequest(2, 20.0, 640, 1, other),  # evicts the first prompt to the host tier
        SimRequest(3, 30.0, 640, 1, prompt),  # a host hit
    ]
    floor = 0.05  # each step's fixed cost, far above the rest
    profile = LatencyProfile(floor, 1e-6, 0.0, 0.0, 0.0)
    pod = PodConfig(capacity_blocks=12, block_size=BLOCK, host_capacity_blocks=40)
    result = simulate(SimConfig(1, pod=pod, profile=profile), iter(requests))
    by_id = {o.request_id: o for o in result.outcomes}
    assert by_id[1].device_hit_tokens == 639
    assert by_id[3].host_hit_tokens > 0
    assert by_id[3].host_hit_tokens + by_id[3].device_hit_tokens == 639
    assert by_id[1].ttft_s == pytest.approx(floor, rel=0.05)
    assert by_id[3].ttft_s == pytest.approx(2 * floor, rel=0.05)


def _one_pod(config: PodConfig, step_s: float = 1.0):
    """A pod whose every step takes step_s, and the outcomes it gives."""
    env = simpy.Environment()
    outcomes: list[Outcome] = []
    profile = LatencyProfile(step_s, 0.0, 0.0, 0.0, 0.0)
    pod = SimPod(env, "pod-0", config, profile, lambda pod, batch: None, outcomes.append)
    return env, pod, outcomes


def test_a_pods_gauges_are_those_of_its_last_steps_end():
    """vLLM's engine sends its stats with each step's output: a scrape during a step reads the
    state its previous step ended in, and a request arriving mid-step is not counted until
    the step after it is taken in ends."""
    hasher = PrefixHasher(BLOCK)
    # every step one second, whatever it computes
    env, pod, _ = _one_pod(PodConfig(capacity_blocks=40, block_size=BLOCK), step_s=1.0)
    first = SimRequest(0, 0.0, 640, 3, Chain(hasher).extend(synthetic_tokens(1, 640)))
    second = SimRequest(1, 0.0, 64, 2, Chain(hasher).extend(synthetic_tokens(2, 64)))
    seen = {}

    def scenario():
        pod.submit(first)
        yield env.timeout(0.5)  # in the first step: nothing has ended yet
        seen["mid-first"] = pod.load()
        pod.submit(second)  # arrives during the first step
        yield env.timeout(0.6)  # 1.1 s: the first step ended; the second is running
        seen["after-first"] = pod.load(num_in_flight=2)
        yield env.timeout(1.0)  # 2.1 s: the step that took the second request in ended
        seen["after-second"] = pod.load()

    env.process(scenario())
    env.run(until=2.5)
    assert seen["mid-first"].num_running == 0 and seen["mid-first"].kv_usage == 0.0
    after = seen["after-first"]
    assert (after.num_running, after.num_waiting, after.num_in_flight) == (1, 0, 2)
    assert after.kv_usage == pytest.approx(11 / 40)  # 640 + 3 tokens: 11 blocks held
    assert seen["after-second"].num_running == 2
    assert seen["after-second"].kv_usage == pytest.approx(13 / 40)


@pytest.mark.parametrize(
    ("budget_tokens", "steps"),
    [(32 * BLOCK, 1), (10 * BLOCK + 4, 2)],
    ids=["one-step", "budget-split"],
)
def test_requests_sent_together_with_one_new_document_compute_it_once(budget_tokens, steps):
    """vLLM caches a chunk's blocks when it schedules it (the forward pass writes each layer's
    KV before attending): a request scheduled after another in the same step hits the blocks
    that one computes in it, and one left for a later step (no token budget) hits every
    block scheduled before. Three requests over one new 10-block document, sent together:
    the document is computed once, whether all three fit one step or the first's chunk
    takes the whole budget and the others come in the next."""
    hasher = PrefixHasher(BLOCK)
    document = synthetic_tokens(7, 10 * BLOCK)
    requests = [
        SimRequest(i, 0.0, 10 * BLOCK + 8, 2, Chain(hasher).extend(document + [i] * 8))
        for i in range(3)
    ]
    config = PodConfig(capacity_blocks=64, block_size=BLOCK, max_batched_tokens=budget_tokens)
    env, pod, outcomes = _one_pod(config)
    for request in requests:
        pod.submit(request)
    env.run()
    by_id = {o.request_id: o for o in outcomes}
    assert [by_id[i].device_hit_tokens for i in range(3)] == [0, 10 * BLOCK, 10 * BLOCK]
    assert [by_id[i].ttft_s for i in range(3)] == pytest.approx([steps * 1.0] * 3)


@pytest.mark.parametrize(
    ("dispatch_s", "ttfts"), [(0.0, [1.0, 1.0, 1.0]), (0.01, [1.01, 2.01, 2.0])]
)
def test_the_router_hands_requests_that_arrive_together_over_one_at_a_time(dispatch_s, ttfts):
    """With `dispatch_s`, the router takes each request that long, one at a time: of two sent
    together to an idle pod, the first starts a step alone and the second waits for the next,
    as on real pods (a step here takes 1 s whatever it computes). A closed-loop request may
    follow one the router has not handed over yet."""
    hasher = PrefixHasher(BLOCK)
    requests = [
        SimRequest(i, 0.0, 2 * BLOCK, 1, Chain(hasher).extend(synthetic_tokens(i, 2 * BLOCK)))
        for i in range(3)
    ]
    requests[2].after = 0  # sent when the first one's answer ends
    config = SimConfig(
        1,
        PodConfig(capacity_blocks=64, block_size=BLOCK),
        LatencyProfile(1.0, 0.0, 0.0, 0.0, 0.0),
        RouterSettings(policy="round_robin", dispatch_s=dispatch_s),
    )
    outcomes = {o.request_id: o for o in simulate(config, requests).outcomes}
    assert [outcomes[i].ttft_s for i in range(3)] == pytest.approx(ttfts)


@pytest.mark.parametrize(
    ("pace_tokens", "ttfts"),
    [(0, [0.25, 0.25, 0.25]), (2048, [0.15, 0.30, 0.15])],
    ids=["off", "2048"],
)
def test_prefill_pacing_holds_a_long_prompt_while_another_is_ahead_at_its_pod(pace_tokens, ttfts):
    """Two cold 1280-token prompts and a cached one sent together to one pod (budget 4096,
    a step 0.05 s plus 0.1 ms a token computed): without pacing both long prompts share a
    0.25 s step. With it the second waits in the router until the first answers: the first
    and the cached one answer after a 0.15 s step, and the second a step's fixed cost later
    than before (mean 0.2 s, not 0.25). A request whose prompt is cached is never held."""
    hasher = PrefixHasher(BLOCK)
    document = synthetic_tokens(1, 20 * BLOCK)
    warm = SimRequest(0, 0.0, 20 * BLOCK, 1, Chain(hasher).extend(document))
    requests = [
        SimRequest(1, 1.0, 20 * BLOCK, 1, Chain(hasher).extend(synthetic_tokens(2, 20 * BLOCK))),
        SimRequest(2, 1.0, 20 * BLOCK, 1, Chain(hasher).extend(synthetic_tokens(3, 20 * BLOCK))),
        SimRequest(3, 1.0, 20 * BLOCK, 1, Chain(hasher).extend(document)),
    ]
    config = SimConfig(
        1,
        PodConfig(capacity_blocks=256, block_size=BLOCK, max_batched_tokens=4096),
        LatencyProfile(0.05, 1e-4 * 0.78125, 0.0, 0.0, 0.0),
        RouterSettings(prefill_pace_tokens=pace_tokens),
    )
    outcomes = {o.request_id: o for o in simulate(config, [warm, *requests]).outcomes}
    assert outcomes[3].device_hit_tokens == 20 * BLOCK - 1  # its last token is computed
    assert [outcomes[i].ttft_s for i in (1, 2, 3)] == pytest.approx(ttfts, abs=1e-3)


def test_profiles_round_trip_as_json(tmp_path: Path):
    path = tmp_path / "profile.json"
    save_profile(H100_LLAMA_8B, path)
    assert load_profile(path) == H100_LLAMA_8B
    path.write_text(json.dumps({**json.loads(path.read_text()), "bogus": 1}))
    with pytest.raises(ValueError, match="bogus"):
        load_profile(path)
    with pytest.raises(ValueError):
        LatencyProfile(-1.0, 0.0, 0.0, 0.0, 0.0)


def test_time_outside_the_engine_adds_to_ttft_and_delays_no_other_request():
    hasher = PrefixHasher(BLOCK)
    requests = [
        SimRequest(i, 0.0, 640, 4, Chain(hasher).extend(synthetic_tokens(i, 640))) for i in range(3)
    ]
    ttfts = {}
    for request_s in (0.0, 0.05):
        profile = LatencyProfile(0.01, 1e-4, 0.0, 1e-3, 0.0, request_s=request_s)
        result = simulate(SimConfig(1, profile=profile), iter(requests))
        ttfts[request_s] = sorted(o.ttft_s for o in result.outcomes)
    assert ttfts[0.05] == pytest.approx([t + 0.05 for t in ttfts[0.0]])


def test_decode_tpot_is_timed_once_the_whole_batch_decodes():
    """The second request's prefill ran in the first's early decode steps (slower, 50 ms):
    only the chunks after its first one count, 10 ms apart for both."""
    first = StreamTiming(0.1, 0.3, "", sent_at=100.0, chunk_s=(0.1, 0.15, 0.2, 0.21, 0.22))
    second = StreamTiming(0.2, 0.23, "", sent_at=100.0, chunk_s=(0.2, 0.21, 0.22, 0.23))
    assert decoding_tpot([first, second]) == pytest.approx(0.01)
    assert decoding_tpot([StreamTiming(0.1, 0.1, "", chunk_s=(0.1,))]) is None


def test_the_cli_prints_a_table_and_writes_the_plot(tmp_path: Path, capsys):
    plot = tmp_path / "sim.png"
    argv = ["run", "--pods", "2,4", "--policies", "round_robin,kv_aware", "--requests", "60"]
    assert cli.main([*argv, "--rate", "2", "--groups", "5", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert out.count("| round_robin |") == 2 and out.count("| kv_aware |") == 2
    assert plot.stat().st_size > 0


# seconds between chunks below which a client read a streamed answer in one burst (it was
# descheduled while the answer came): a decode step of the tiny model here takes ~2 ms
BURST_INTERVAL_S = 1e-4


@pytest.mark.server
def test_calibrate_fits_a_profile_from_a_real_server(vllm_servers, tiny_model, tmp_path):
    server = vllm_servers.launch(VLLMServerConfig(model=tiny_model, cpu_cores="0"), "sim-calibrate")
    out = tmp_path / "profile.json"
    argv = ["calibrate", server.url, "--out", str(out), "--lengths", "256,1024,4096"]
    assert cli.main([*argv, "--batches", "1,2", "--output-tokens", "8"]) == 0
    profile = load_profile(out)
    assert profile.prefill_s_per_token > 0
    assert profile.step_s(4096, 0, 0, 0) > profile.step_s(256, 0, 0, 0)
    assert server.url in profile.source
    # the decode fit predicts what a client measures between chunks, within a factor 3: the
    # median of three answers read as they came. A client descheduled for a whole answer on a
    # busy CI box reads it in one burst, 12-17 us between chunks (seen twice, once in two
    # answers of three): no decode step is that short, so such a reading is taken again
    intervals: list[float] = []
    bursts: list[float] = []
    while len(intervals) < 3 and len(bursts) < 10:
        timing = timed_stream(server.url, server.model_name, list(range(5, 261)), 32)
        # (a chunk may carry two tokens, the detokenizer waiting for a whole character)
        assert 24 <= len(timing.chunk_s) <= 32
        assert timing.chunk_s[0] == pytest.approx(timing.ttft_s)
        interval = (timing.chunk_s[-1] - timing.chunk_s[0]) / (len(timing.chunk_s) - 1)
        (intervals if interval > BURST_INTERVAL_S else bursts).append(interval)
    assert len(intervals) == 3, f"answers read in bursts only: {bursts}"
    measured = sorted(intervals)[1]
    predicted = profile.step_s(0, 0, 1, 256)
    assert measured / 3 < predicted < measured * 3, (intervals, predicted)


@pytest.mark.server
def test_calibrate_prices_a_cached_prefix_on_a_pod_too_small_to_keep_the_sweeps(
    vllm_servers, tiny_model, tmp_path
):
    """A device cache of 10,240 tokens (tiny, float32: 2 KiB a token) and no lower tier: the
    sweeps send 16,128 prompt tokens, so a prompt sent again only after them all would be
    computed again and priced as cached. Each length's prompt is sent again right after its
    first run, and a cached token costs well under a computed one."""
    config = VLLMServerConfig(model=tiny_model, cpu_cores="0", kv_cache_bytes=20 << 20)
    server = vllm_servers.launch(config, "sim-calibrate-small-cache")
    out = tmp_path / "profile.json"
    argv = ["calibrate", server.url, "--out", str(out), "--lengths", "256,1024,4096"]
    assert cli.main([*argv, "--batches", "1,2", "--output-tokens", "2"]) == 0
    profile = load_profile(out)
    assert 0 <= profile.prefill_s_per_cached_token < profile.prefill_s_per_token / 2, profile


def test_requests_keep_their_order_and_ids():
    requests: list[SimRequest] = _llmd(50, rate=10.0)
    assert [r.request_id for r in requests] == list(range(50))
    arrivals = [r.arrival_s for r in requests]
    assert arrivals == sorted(arrivals)


def test_received_blocks_are_cached_free_and_published_as_room_allows():
    cache = PrefixCache(capacity_blocks=4, block_size=4)
    held = cache.allocate([9], 1, cache.hit([9]))  # one block a running request holds
    cache.cache(held, [9])
    cache.take_events()
    assert cache.receive([1, 2, 3, 4]) == 3  # room for three: the tail does not fit
    assert _stored(cache.take_events()) == [1, 2, 3]
    assert cache.hit([1, 2, 3, 4]) == Hit(3, 0)
    assert cache.usage == 0.25  # received blocks are cached, held by no request
    assert cache.receive([1, 2]) == 0 and cache.take_events() == []


def test_hot_prefix_copies_spread_a_hot_group_that_kv_aware_piles_on_one_pod():
    """Half the traffic on one group at a time (a new one every 500 requests): kv_aware keeps
    sending it to the pod its first request landed on until that pod saturates; with copies
    (the router's own HotPrefixes) the group reaches other pods early and TTFT falls."""
    hasher = PrefixHasher(BLOCK)
    shape = SharedPrefixShape(num_groups=50, hot_share=0.5, hot_every=500)
    requests = list(shared_prefix(hasher, 2000, 8 * 9.0, shape))
    results = {
        copies: simulate(
            SimConfig(8, router=RouterSettings(policy="kv_aware", replicate_after=copies)),
            iter(requests),
        )
        for copies in (0, 3)
    }
    plain, copied = results[0], results[3]
    assert plain.router.num_copies == 0 and copied.router.num_copies >= 4
    assert copied.summary.policy == "kv_aware+copy"
    assert copied.summary.ttft_s[1] * 1.5 < plain.summary.ttft_s[1], (copied.summary, plain.summary)
    # the copies cost no prefix hits
    assert copied.summary.hit_rate >= plain.summary.hit_rate - 0.01


def test_policy_slo_reports_how_well_the_routers_latency_model_predicted():
    """The latency models learn from every answer (the router's own `LatencyModels`) and a
    run reports the median relative error of their TTFT predictions; under the other
    policies nothing learns (it would change no decision) and none is reported."""
    requests = _llmd(600, rate=2 * 3.0)
    runs = {
        policy: simulate(
            SimConfig(2, router=RouterSettings(policy=policy, slo=SLO(0.5, 0.05))),
            iter(requests),
        )
        for policy in ("slo", "kv_aware")
    }
    slo = runs["slo"]
    assert slo.summary.ttft_error_p50 is not None and slo.summary.ttft_error_p50 < 0.5
    assert len(slo.router.ttft_errors) > 500  # every request once the models are warm
    assert runs["kv_aware"].summary.ttft_error_p50 is None
    assert "TTFT pred. error" in table([slo.summary])


@pytest.mark.parametrize("kv_room", [False, True])
def test_the_simulated_router_applies_kv_room_as_the_router_does(kv_room):
    """With --kv-room, a pod whose cache cannot hold a request beside the router's request in
    flight there is passed over, though it holds the request's prefix; without, the prefix wins."""
    router = SimRouter(RouterSettings(kv_room=kv_room), ["pod-a", "pod-b"], BLOCK, lambda: 0.0)
    for pod in ("pod-a", "pod-b"):
        router.scraped(pod, PodLoad(kv_blocks=6))
    doc_a, doc_b = [1, 2, 3, 4], [11, 12, 13, 14]
    for hashes in (doc_a, doc_b):  # pod-a holds both documents
        stored = BlockStored(
            block_hashes=tuple(hashes),
            parent_block_hash=None,
            token_ids=tuple(range(BLOCK * len(hashes))),
            block_size=BLOCK,
            medium=MEDIUM_GPU,
        )
        router.ingest("pod-a", EventBatch(ts=0.0, events=(stored,)))
    first = router.route(1, doc_a, 4 * BLOCK + 1, 4)  # 4 blocks and one of its own
    assert first.decode.pod == "pod-a"
    second = router.route(2, doc_b, 4 * BLOCK + 1, 4)  # 5 held + 5 new > 6 blocks
    assert second.decode.pod == ("pod-b" if kv_room else "pod-a"), second.decode.reason
