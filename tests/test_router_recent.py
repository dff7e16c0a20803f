"""The router's memory of prefixes it just routed (`router/recent.py`): a second request on a
prefix follows the first to its pod before that pod's KV events arrive, for `ttl_s` only."""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import FakeClock

from vllm_llmd.router.config_parse import parse_config
from vllm_llmd.router.index import InMemoryIndex
from vllm_llmd.router.metrics import RouterMetrics
from vllm_llmd.router.pods import PodRegistry
from vllm_llmd.router.proxy import Router
from vllm_llmd.router.recent import RecentRoutes
from vllm_llmd.router.request_record import RequestRecord
from vllm_llmd.router.scoring import PodCache, make_policy


def test_runs_are_per_pod_and_expire():
    clock = FakeClock()
    recent = RecentRoutes(ttl_s=5, clock=clock)
    recent.record("a", [1, 2, 3])
    assert recent.run_length("a", [1, 2, 3, 4]) == 3
    assert recent.run_length("a", [2, 3]) == 2 and recent.run_length("a", [9]) == 0
    assert recent.run_length("b", [1, 2]) == 0  # only where it was sent
    clock.now += 4
    recent.record("b", [1])
    clock.now += 2  # a's entries are 6 s old, b's 2 s
    assert recent.run_length("a", [1]) == 0 and recent.run_length("b", [1, 2]) == 1
    clock.now += 10
    recent.record("c", [7])  # expired entries go as new ones come: memory follows the rate
    assert len(recent) == 1
    with pytest.raises(ValueError, match="ttl_s > 0"):
        RecentRoutes(ttl_s=0)


def test_bounded_by_entries():
    recent = RecentRoutes(ttl_s=60, max_entries=2)
    recent.record("a", [1, 2, 3])
    assert recent.run_length("a", [1]) == 0 and recent.run_length("a", [2, 3]) == 2


def _router(*flags: str) -> Router:
    config = parse_config(["--pod", "http://a:1", "--pod", "http://b:1", *flags])
    registry = PodRegistry(config.pods, None)
    for pod in registry.pods.values():
        pod.hashes_ok = True
    policy = make_policy("kv_aware")
    return Router(config, registry, InMemoryIndex(), None, policy, RouterMetrics())


def test_the_router_counts_a_routed_prefix_past_what_the_index_shows():
    router = _router()
    router.index.add("http://a:1", "CPU", [1])  # a's events so far: block 1, in its host tier
    router.prompts.routed("http://a:1", [1, 2, 3])  # the router just sent [1, 2, 3] there
    caches = router.prompts._caches([1, 2, 3, 4])
    assert caches["http://a:1"] == PodCache(3, ("CPU", "GPU", "GPU"))
    assert "http://b:1" not in caches
    off = _router("--recent-route-ttl-s", "0")
    assert off.prompts.recent is None


def test_runs_of_every_pod_in_one_walk_agree_with_run_length():
    clock = FakeClock()
    recent = RecentRoutes(ttl_s=5, clock=clock)
    recent.record("a", [1, 2, 3])
    recent.record("b", [1, 2])
    recent.record("c", [2, 3])  # not from the first block: no run
    clock.now += 1
    recent.record("d", [1])
    for hashes in ([1, 2, 3, 4], [1, 2, 3], [1], [2, 3], [], [9, 1]):
        expected = {p: recent.run_length(p, hashes) for p in "abcd"}
        assert recent.runs(hashes) == {p: n for p, n in expected.items() if n}, hashes
    assert recent.runs([1, 2, 3, 4]) == {"a": 3, "b": 2, "d": 1}
    clock.now += 4.5  # a, b and c expired; d not
    assert recent.runs([1, 2]) == {"d": 1}


def test_requests_looked_up_together_still_follow_each_other(monkeypatch):
    """Requests that arrive together are all looked up (off the event loop) before the first
    is routed; the second on a prefix must still go where the first went, not by load."""
    router = _router()
    for pod in router.registry.pods.values():
        pod.healthy = True
    hashes = [7, 8, 9]

    async def tokenized(path: str, body: object) -> tuple[list[int], int]:
        return hashes, 3 * 128

    def decide() -> str:
        record = RequestRecord("/v1/completions", time.time(), time.monotonic())
        route = asyncio.run(router.decide(record, {}, {"model": "m", "prompt": "q"}))
        return route.decode.pod

    prompts = router.prompts
    monkeypatch.setattr(prompts, "hashes", tokenized)
    alone = decide()  # where a request of this prefix goes with nothing routed before it
    other = next(pod for pod in router.registry.pods if pod != alone)
    prompts.recent = RecentRoutes()  # forget that route

    async def stale(hashes: list[int]) -> dict[str, PodCache]:
        caches = prompts._caches(hashes)  # looked up before the first was routed...
        prompts.routed(other, hashes)  # ...which then went to the other pod
        return caches

    monkeypatch.setattr(prompts, "lookup", stale)
    assert decide() == other
