"""The router's view of the shared KV tier (medium SHARED): both backends (in memory, and a
real redis-server) keep runs, forget on removal and on TTL, and know which pods are connected;
the ingestor sends SHARED events there and nowhere else; a shared run is a saving on every
connected pod alike, so kv_aware routes such a request by load."""

from __future__ import annotations

import time

import pytest
from conftest import FakeClock

from vllm_llmd.events.model import MEDIUM_CPU, MEDIUM_SHARED, BlockRemoved, BlockStored
from vllm_llmd.events.updates import ReceivedBatch
from vllm_llmd.router.event_apply import PodStats, apply_update
from vllm_llmd.router.index import InMemoryIndex
from vllm_llmd.router.load import PodLoad
from vllm_llmd.router.scoring import PodCache, ScoreInput, ScoringConfig, make_policy
from vllm_llmd.router.shared_view import InMemorySharedView, RedisSharedView, extend_with_shared


@pytest.fixture(params=["memory", "redis"])
def make_view(request):
    """make_view(ttl_s) -> a fresh view of the parametrized backend."""
    views = []

    def make(ttl_s: float = 60.0):
        if request.param == "memory":
            view = InMemorySharedView(ttl_s)
        else:
            url = request.getfixturevalue("redis_url")
            view = RedisSharedView(
                url, namespace=f"t{len(views)}{time.monotonic_ns()}", ttl_s=ttl_s
            )
        views.append(view)
        return view

    yield make
    for view in views:
        view.close()


def test_runs_count_from_the_first_block_and_stop_at_a_gap(make_view):
    view = make_view()
    view.mark("pod-a", [1, 2, 3, 5])
    assert view.run_length([1, 2, 3, 4, 5]) == 3
    assert view.run_length([2, 3]) == 2
    assert view.run_length([9, 1]) == 0
    assert view.run_length([]) == 0
    view.forget("pod-b", [2])  # any pod's miss cuts everyone's run
    assert view.run_length([1, 2, 3]) == 1
    view.forget("pod-b", [42])  # unknown: a no-op
    assert view.members() == {"pod-a", "pod-b"}
    view.remove_member("pod-a")
    assert view.members() == {"pod-b"}
    assert view.stats().num_members == 1


def test_entries_expire_unless_announced_again(make_view):
    view = make_view(ttl_s=0.3)
    view.mark("pod-a", [1, 2])
    time.sleep(0.15)
    view.mark("pod-a", [1])  # a hit re-announces: block 1 stays, block 2 ages out
    time.sleep(0.2)
    assert view.run_length([1, 2]) == 1
    time.sleep(0.2)
    assert view.run_length([1, 2]) == 0


def test_memory_view_is_bounded_lru_and_counts_what_lives():
    clock = FakeClock()
    view = InMemorySharedView(ttl_s=10, max_entries=3, clock=clock)
    view.mark("p", [1, 2, 3])
    view.mark("p", [1])  # refreshed: 2 is now the oldest
    view.mark("p", [4])
    assert view.run_length([2]) == 0 and view.run_length([1]) == 1
    assert view.stats().num_blocks == 3
    clock.now += 11
    assert view.stats().num_blocks == 0
    with pytest.raises(ValueError, match="ttl_s must be > 0"):
        InMemorySharedView(ttl_s=0)


def _batch(*events) -> ReceivedBatch:
    from vllm_llmd.events.model import EventBatch

    return ReceivedBatch("pod-a", 0, EventBatch(ts=time.time(), events=tuple(events)))


def _stored(hashes: list[int], medium: str) -> BlockStored:
    return BlockStored(
        block_hashes=hashes,
        parent_block_hash=None,
        token_ids=list(range(16 * len(hashes))),
        block_size=16,
        medium=medium,
    )


def test_ingest_sends_shared_events_to_the_view_and_never_to_the_index():
    index, view, stats = InMemoryIndex(), InMemorySharedView(), PodStats()
    update = _batch(
        _stored([1, 2, 3], MEDIUM_SHARED),
        _stored([1], MEDIUM_CPU),
        BlockRemoved(block_hashes=[3], medium=MEDIUM_SHARED),
    )
    apply_update(index, "pod-a", update, stats, view)
    assert view.run_length([1, 2, 3]) == 2 and view.members() == {"pod-a"}
    hits = index.lookup_prefix([1, 2, 3])
    assert {pod: hit.tiers for pod, hit in hits.items()} == {"pod-a": ("CPU",)}
    assert stats.num_bad_events == 0
    # a router without a view skips them: not an error, not in the index
    bare_index, bare_stats = InMemoryIndex(), PodStats()
    apply_update(bare_index, "pod-a", update, bare_stats)
    assert bare_index.lookup_prefix([1, 2, 3])["pod-a"].num_blocks == 1
    assert bare_stats.num_bad_events == 0


def test_shared_run_extends_every_member_past_its_own_blocks():
    caches = {"a": PodCache(2, ("GPU", "GPU")), "b": PodCache(5, ("CPU",) * 5)}
    extended = extend_with_shared(caches, {"a", "c"}, 4)
    assert extended["a"] == PodCache(4, ("GPU", "GPU", "SHARED", "SHARED"))
    assert extended["b"] == caches["b"]  # not a member: only its own blocks
    assert extended["c"] == PodCache(4, ("SHARED",) * 4)
    assert extend_with_shared(caches, {"a"}, 0) == caches


def test_kv_aware_routes_a_shared_only_prefix_by_load_and_prefers_a_local_copy():
    policy = make_policy("kv_aware", ScoringConfig())
    loads = {"a": PodLoad(num_running=3), "b": PodLoad(num_running=1)}
    shared_only = extend_with_shared({}, {"a", "b"}, 8)
    decision = policy.choose(ScoreInput(10, ["a", "b"], shared_only, loads))
    assert decision.pod == "b", decision  # same saving on both: the less loaded pod
    # without the view, b would look as uncached as a; with a's own GPU copy, a wins at equal load
    even = {"a": PodLoad(num_running=1), "b": PodLoad(num_running=1)}
    own = extend_with_shared({"a": PodCache(8, ("GPU",) * 8)}, {"a", "b"}, 8)
    assert policy.choose(ScoreInput(10, ["a", "b"], own, even)).pod == "a"
