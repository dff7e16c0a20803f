"""Hot prefixes copied ahead of demand (router/replication.py).

`HotPrefixes` is pure: routes made by the real `decide_route` go in, planned copies come out,
on a clock the test moves. `Replicator` runs a copy against real HTTP pods that record what
they receive (tests/router_harness.py): the holder's one-token first step, then the target's
one-token request carrying the holder's kv_transfer_params. (A copy between real vLLM pods,
the KV pulled and then hit, is in test_router_e2e.py.)
"""

from __future__ import annotations

import asyncio
import dataclasses

import aiohttp
import pytest
from prometheus_client import generate_latest
from router_harness import MODEL, RecordingPod, metric

from vllm_llmd.devtools.client import metric_sum
from vllm_llmd.prometheus_text import parse_prometheus_text
from vllm_llmd.router.latency import LatencyModels, Prediction
from vllm_llmd.router.load import PodLoad
from vllm_llmd.router.metrics import RouterMetrics
from vllm_llmd.router.off_loop import OffLoop
from vllm_llmd.router.recent import RecentRoutes
from vllm_llmd.router.replication import (
    WINDOW_S,
    WORKING_SET_S,
    HotPrefixes,
    Replication,
    Replicator,
    WorkingSets,
)
from vllm_llmd.router.routing import Route, RoutingPolicy, decide_route
from vllm_llmd.router.scoring import PodCache, make_policy
from vllm_llmd.router.slo import SLO, RequestClass

BLOCK = 16
A, B, C = "http://a:1", "http://b:1", "http://c:1"
HASHES = list(range(100, 108))  # a prompt of 8 blocks


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _route(policy: str, held: dict[str, int], loads: dict[str, PodLoad] | None = None) -> Route:
    how = RoutingPolicy(make_policy(policy), None, LatencyModels(8), BLOCK, 64)
    caches = {pod: PodCache(n, ("GPU",) * n) for pod, n in held.items()}
    pods = [A, B, C]
    loads = loads or {pod: PodLoad() for pod in pods}
    return decide_route(
        how, "r", len(HASHES), len(HASHES) * BLOCK, RequestClass(SLO()), pods, [], caches, loads
    )


def _past_a() -> Route:
    """A request whose prefix A holds (6 of its 8 blocks), routed past A: A is saturated."""
    return _route("kv_aware", {A: 6}, {A: PodLoad(num_waiting=8), B: PodLoad(), C: PodLoad()})


def _hot(clock: Clock, after: int = 3, per_minute: int = 6) -> HotPrefixes:
    return HotPrefixes(after, per_minute, min_tokens=4 * BLOCK, clock=clock)


def test_a_prefix_routed_past_its_holder_is_copied_once_it_is_hot():
    clock = Clock()
    hot = _hot(clock)
    routes = [_past_a() for _ in range(3)]
    assert routes[0].decode.pod != A
    planned = [hot.observe(route, HASHES, BLOCK) for route in routes]
    assert planned[:2] == [[], []]
    [copy] = planned[2]  # one holder: one copy
    assert (copy.source, copy.num_blocks, copy.key) == (A, 6, HASHES[5])
    # not the pod this request takes the prefix to: it gets it anyway
    assert copy.target not in (A, routes[2].decode.pod)


def test_a_queue_at_the_holder_presses_and_a_quiet_holder_does_not():
    clock = Clock()
    hot = _hot(clock, after=2)
    busy = {A: PodLoad(num_in_flight=3, num_prefilling=3), B: PodLoad(), C: PodLoad(num_waiting=1)}
    quiet = {A: PodLoad(num_in_flight=1, num_prefilling=1), B: PodLoad(), C: PodLoad()}
    for _ in range(5):  # kv_aware keeps the request on A, which has room
        route = _route("kv_aware", {A: 6}, quiet)
        assert route.decode.pod == A
        assert hot.observe(route, HASHES, BLOCK) == []
    route = _route("kv_aware", {A: 6}, busy)
    assert route.decode.pod == A and hot.observe(route, HASHES, BLOCK) == []
    copy = hot.observe(_route("kv_aware", {A: 6}, busy), HASHES, BLOCK)
    # the least-loaded pod lacking it: B (C has a request waiting)
    assert copy == [Replication(A, B, 6, HASHES[5])]


def test_with_an_slo_and_a_warm_model_the_holder_presses_when_predicted_late():
    clock = Clock()
    hot = _hot(clock, after=2)
    quiet = {A: PodLoad(), B: PodLoad(), C: PodLoad()}
    busy = {A: PodLoad(num_in_flight=3, num_prefilling=3), B: PodLoad(), C: PodLoad()}

    def routed(loads: dict[str, PodLoad], predicted_s: float) -> Route:
        route = _route("kv_aware", {A: 6}, loads)
        assert route.decode.pod == A
        return dataclasses.replace(
            route,
            request_class=RequestClass(SLO(ttft_s=0.5)),
            prediction=Prediction(predicted_s, None),
        )

    # a queue the model says the holder still serves in time: no pressure
    for _ in range(3):
        assert hot.observe(routed(busy, 0.3), HASHES, BLOCK) == []
    # no queue, but predicted past the SLO: pressure
    assert hot.observe(routed(quiet, 0.8), HASHES, BLOCK) == []
    assert hot.observe(routed(quiet, 0.8), HASHES, BLOCK) == [Replication(A, B, 6, HASHES[5])]


def test_the_holders_double_while_the_pressure_lasts():
    clock = Clock()
    hot = _hot(clock, after=1, per_minute=60)
    pods = [f"http://p{i}:1" for i in range(8)]
    how = RoutingPolicy(make_policy("kv_aware"), None, LatencyModels(8), BLOCK, 64)

    def pressed(holders: list[str]) -> list[Replication]:
        caches = {pod: PodCache(6, ("GPU",) * 6) for pod in holders}
        loads = {pod: PodLoad() for pod in pods}
        loads.update({pod: PodLoad(num_in_flight=2, num_prefilling=2) for pod in holders})
        route = decide_route(how, "r", 8, 8 * BLOCK, RequestClass(SLO()), pods, [], caches, loads)
        return hot.observe(route, HASHES, BLOCK)

    holders = [pods[0]]
    for expected in (1, 2, 4):  # one copy per holder, each from another holder
        copies = pressed(holders)
        assert len(copies) == expected and sorted(c.source for c in copies) == sorted(holders)
        assert not {c.target for c in copies} & set(holders)
        assert pressed(holders + [c.target for c in copies]) == []  # cooling down
        for copy in copies:
            hot.done(copy)
        holders += [c.target for c in copies]
        clock.now += WINDOW_S
    assert len(holders) == 8 and pressed(holders) == []  # every pod holds it


def test_pressure_older_than_the_window_is_forgotten():
    clock = Clock()
    hot = _hot(clock)
    route = _past_a()
    for _ in range(2):
        assert hot.observe(route, HASHES, BLOCK) == []
    clock.now += WINDOW_S + 0.1
    assert hot.observe(route, HASHES, BLOCK) == []  # 1 within the window, not 3
    assert hot.observe(route, HASHES, BLOCK) == []
    assert hot.observe(route, HASHES, BLOCK) != []


def test_copies_are_bounded_per_target_per_prefix_and_per_minute():
    clock = Clock()
    hot = _hot(clock, after=1, per_minute=2)
    [first] = hot.observe(_past_a(), HASHES, BLOCK)
    # the same prefix cools down, even under pressure
    assert hot.observe(_past_a(), HASHES, BLOCK) == []
    # another prefix: not to the pod still receiving the first copy
    other = [h + 1000 for h in HASHES]
    [second] = hot.observe(_route("kv_aware", {A: 6, B: 0}, _busy_a()), other, BLOCK)
    assert second.target != first.target
    # the third copy this minute is over the budget, even once the targets are free
    hot.done(first)
    hot.done(second)
    third = [h + 2000 for h in HASHES]
    assert hot.observe(_route("kv_aware", {A: 6}, _busy_a()), third, BLOCK) == []
    clock.now += 61.0
    assert hot.observe(_route("kv_aware", {A: 6}, _busy_a()), third, BLOCK) != []


def test_a_short_prefix_or_one_every_pod_holds_is_not_copied():
    clock = Clock()
    hot = _hot(clock, after=1)
    saturated_a = {A: PodLoad(num_waiting=8), B: PodLoad(), C: PodLoad()}
    short = _route("kv_aware", {A: 3}, saturated_a)
    assert hot.observe(short, HASHES, BLOCK) == []  # 3 blocks: under min_tokens
    # 6 blocks of 8 tokens (pods of block size 8) are 48 tokens: under 4 * 16 too
    assert hot.observe(_route("kv_aware", {A: 6}, saturated_a), HASHES, 8) == []
    assert hot.observe(_route("kv_aware", {A: 6, B: 6, C: 6}, _busy_a()), HASHES, BLOCK) == []
    # a pod whose KV cache is nearly full receives no copy: it would evict what it serves
    full = {A: PodLoad(num_in_flight=2, num_prefilling=2), B: PodLoad(kv_usage=0.9)}
    full[C] = PodLoad(kv_usage=0.85)
    assert hot.observe(_route("kv_aware", {A: 6}, full), HASHES, BLOCK) == []
    # held deeper than this request's own blocks: a stale index entry, not this prompt
    assert hot.observe(_past_a(), HASHES[:4], BLOCK) == []
    with pytest.raises(ValueError, match="after, per_minute and min_tokens"):
        HotPrefixes(0, 1, 1)


def test_a_copy_goes_only_where_it_fits_beside_the_targets_working_set():
    """vLLM evicts the least recently used blocks to make room: a copy into a cache full of
    what its pod served lately would evict that, and the pod's next requests recompute it."""
    clock = Clock()
    hot = _hot(clock, after=1)
    loads = {
        A: PodLoad(num_waiting=8, kv_blocks=16),  # the holder, saturated
        B: PodLoad(kv_blocks=16),
        C: PodLoad(num_in_flight=1, kv_blocks=16),
    }
    for first in (200, 300):  # C served two other 6-block prompts: 12 of its 16 blocks
        route = _route("kv_aware", {C: 6}, loads)
        assert route.decode.pod == C
        assert hot.observe(route, list(range(first, first + 6)), BLOCK) == []
    past_a = _route("kv_aware", {A: 6}, loads)
    assert past_a.decode.pod == B  # the least loaded: C is the only pod left to copy to
    assert hot.observe(past_a, HASHES, BLOCK) == []  # 12 + 6 blocks > 16
    clock.now += WORKING_SET_S  # C's prompts are no longer its working set
    assert hot.observe(past_a, HASHES, BLOCK) == [Replication(A, C, 6, HASHES[5])]


def test_a_working_set_is_what_was_sent_within_its_window_up_to_the_cache_size():
    working = WorkingSets(window_s=10.0)
    working.touch(A, [1, 2, 3], now=0.0, capacity=4)
    working.touch(A, [3, 4], now=5.0, capacity=4)  # distinct blocks: 3 counts once
    assert working.size(A, now=5.0) == 4
    working.touch(A, [5], now=6.0, capacity=4)  # past the cache's size: the oldest goes
    assert working.size(A, now=6.0) == 4
    assert working.size(A, now=10.5) == 3  # 1 and 2 (sent at 0) are out of the window
    working.touch(B, [1], now=0.0, capacity=0)  # a pod of unknown size: nothing is kept
    assert working.size(B, now=0.0) == working.size(C, now=0.0) == 0
    # a pod sent nothing for a window is forgotten at the next sweep (it may have left)
    working = WorkingSets(window_s=10.0)
    working.touch(A, [1], now=1.0, capacity=4)
    working.touch(B, [2], now=9.0, capacity=4)
    assert len(working) == 2
    working.touch(B, [3], now=12.0, capacity=4)  # a window since the last sweep: sweeps
    assert len(working) == 1 and working.size(B, now=12.0) == 2
    with pytest.raises(ValueError, match="window_s"):
        WorkingSets(window_s=0.0)


def _busy_a() -> dict[str, PodLoad]:
    return {A: PodLoad(num_in_flight=2, num_prefilling=2), B: PodLoad(), C: PodLoad()}


class _Tokens:
    """Stands in for TokenProcessor: a prompt of known token ids (the tokenizer is tested in
    test_router_tokens.py; here what matters is what the pods receive)."""

    block_size = BLOCK

    def tokenize_request(self, path: str, body: dict) -> object:
        class Tokenized:
            token_ids = list(range(5, 5 + 8 * BLOCK))

        return Tokenized()


async def _copy_between(source: RecordingPod, target: RecordingPod, recent: RecentRoutes) -> str:
    """Run one planned copy from source to target; the router's metrics text after it."""
    metrics = RouterMetrics()
    hot = HotPrefixes(1, 6, min_tokens=4 * BLOCK)
    tokenize = OffLoop("test-tokenize", 1, 5.0)
    replicator = Replicator(hot, _Tokens(), tokenize, metrics, recent)  # type: ignore[arg-type]
    route = _past_a()  # passes A over: the plan below is due
    copy = Replication(source.url, target.url, 6, HASHES[5])
    hot.observe = lambda *_: [copy]  # type: ignore[method-assign]  # the pods' real URLs
    try:
        async with aiohttp.ClientSession() as session:
            body = {"model": MODEL, "prompt": "a long shared document ..."}
            replicator.observe(session, route, HASHES, "/v1/completions", body)
            await asyncio.wait_for(asyncio.gather(*replicator._tasks), 10)
            await replicator.stop()
    finally:
        tokenize.close()
    assert hot._receiving == set()  # the target may receive another copy
    return generate_latest(metrics.registry).decode()


def test_the_replicator_runs_the_copy_as_a_pd_pair_of_one_token_requests():
    async def run() -> tuple[list, list, str, str, RecentRoutes]:
        source, target = await RecordingPod().start(), await RecordingPod().start()
        source.answer = {"choices": [{"text": "x"}], "kv_transfer_params": {"remote": 1}}
        recent = RecentRoutes(60.0)
        try:
            text = await _copy_between(source, target, recent)
        finally:
            await source.stop()
            await target.stop()
        return source.received, target.received, text, target.url, recent

    first, second, text, target_url, recent = asyncio.run(run())
    prompt = list(range(5, 5 + 6 * BLOCK + 1))  # the 6 blocks held, and one token past them
    [(path, body)] = first
    assert path == "/v1/completions" and body["prompt"] == prompt and body["max_tokens"] == 1
    assert body["kv_transfer_params"] == {"do_remote_decode": True}
    [(path, body)] = second
    assert body["prompt"] == prompt and body["kv_transfer_params"] == {"remote": 1}
    assert (
        metric_sum(parse_prometheus_text(text), "llmd:router_prefix_copies_total", outcome="done")
        == 1
    )
    # the target counts as holding the prefix at once, before its KV events say so
    assert recent.run_length(target_url, HASHES) == 6


def test_a_failed_copy_is_counted_and_frees_its_target():
    async def run() -> tuple[list, str]:
        source, target = await RecordingPod().start(), await RecordingPod().start()
        source.answer = {"choices": [{"text": "x"}]}  # no kv_transfer_params: not a connector
        try:
            text = await _copy_between(source, target, RecentRoutes(60.0))
        finally:
            await source.stop()
            await target.stop()
        return target.received, text

    received, text = asyncio.run(run())
    assert received == []  # nothing to pull: the target is not asked
    counts = parse_prometheus_text(text)
    assert metric_sum(counts, "llmd:router_prefix_copies_total", outcome="failed") == 1
    assert metric_sum(counts, "llmd:router_prefix_copies_total", outcome="done") == 0


def test_a_holder_that_queues_gets_its_hot_prefix_copied_through_a_real_router(tiny_model):
    """A real in-process router (kv_aware) before two recording pods: requests of one prompt
    follow the pod it went to first; once two of them find two others still waiting there,
    the router copies the prefix to the other pod, which receives the one-token request with
    the holder's kv_transfer_params. Client requests are never sent there meanwhile."""
    from router_harness import running_router

    from vllm_llmd.devtools.model_maker import sample_text
    from vllm_llmd.router.index import InMemoryIndex
    from vllm_llmd.router.tokens import TokenProcessor

    tokens = TokenProcessor(tiny_model, BLOCK)
    prompt = sample_text(12 * BLOCK, seed=77)

    async def ask(session: aiohttp.ClientSession, url: str) -> None:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
        async with session.post(url + "/v1/completions", json=body) as response:
            assert response.status == 200, await response.text()

    async def run() -> tuple[RecordingPod, RecordingPod, float]:
        a, b = await RecordingPod().start(), await RecordingPod().start()
        for pod in (a, b):
            pod.answer = {"choices": [{"text": "x"}], "kv_transfer_params": {"from": pod.url}}
            pod.delay_s = 0.5
        flags = [
            "--pod",
            a.url,
            "--pod",
            b.url,
            "--policy",
            "kv_aware",
            "--tokenizer",
            str(tiny_model),
        ]
        flags += ["--replicate-hot-prefixes", "2", "--pd-threshold-tokens", str(4 * BLOCK)]
        try:
            async with (
                running_router(flags, tokens=tokens, index=InMemoryIndex()) as (_, url),
                aiohttp.ClientSession() as session,
            ):
                await ask(session, url)  # the prefix is now the first pod's (recent routes)
                await asyncio.gather(*(ask(session, url) for _ in range(4)))
                await asyncio.sleep(1.5)  # the copy's two steps, 0.5 s each
                copies = await metric(session, url, "llmd:router_prefix_copies_total")
        finally:
            await a.stop()
            await b.stop()
        return a, b, copies

    a, b, copies = asyncio.run(run())
    holder, other = (a, b) if len(a.received) > len(b.received) else (b, a)
    assert copies == 1
    # the holder served all five client requests and the copy's first step
    assert [body["max_tokens"] for _, body in holder.received] == [2] * 5 + [1]
    assert holder.received[-1][1]["kv_transfer_params"] == {"do_remote_decode": True}
    # the other pod got only the copy: the prefix's tokens, pulled with the holder's params
    [(_, copy)] = other.received
    assert copy["max_tokens"] == 1 and copy["kv_transfer_params"] == {"from": holder.url}
    assert (
        copy["prompt"]
        == tokens.tokenize_request("/v1/completions", {"prompt": prompt}).token_ids[
            : len(copy["prompt"])
        ]
    )
    assert len(copy["prompt"]) % BLOCK == 1 and len(copy["prompt"]) > 4 * BLOCK
