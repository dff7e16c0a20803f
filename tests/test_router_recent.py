"""The router's memory of prefixes it just routed (`router/recent.py`): a second request on a
prefix follows the first to its pod before that pod's KV events arrive, for `ttl_s` only."""

from __future__ import annotations

import pytest
from conftest import FakeClock

from vllm_llmd.router.config_parse import parse_config
from vllm_llmd.router.index import InMemoryIndex
from vllm_llmd.router.metrics import RouterMetrics
from vllm_llmd.router.pods import PodRegistry
from vllm_llmd.router.proxy import Router
from vllm_llmd.router.recent import RecentRoutes
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
    router.recent.record("http://a:1", [1, 2, 3])  # the router just sent [1, 2, 3] there
    caches = router._caches([1, 2, 3, 4])
    assert caches["http://a:1"] == PodCache(3, ("CPU", "GPU", "GPU"))
    assert "http://b:1" not in caches
    off = _router("--recent-route-ttl-s", "0")
    assert off.recent is None
