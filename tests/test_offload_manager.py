"""OffloadManager: the tiers' bookkeeping walked through every path, no tensors involved."""

from __future__ import annotations

import pytest

from vllm_llmd.offload.manager import OffloadManager, OffloadTier, TierEvent

K = [bytes([i]) * 32 for i in range(20)]


def stored(manager, keys):
    planned = manager.prepare_store(keys)
    manager.complete_store([k for k, _ in planned])
    return planned


def test_store_then_lookup_and_load_from_host():
    m = OffloadManager(num_host_slots=4, num_disk_blocks=0)
    assert [k for k, _ in stored(m, K[:3])] == K[:3]
    assert m.lookup(K[:4]) == (3, 3)
    assert m.lookup(K[1:3]) == (2, 2)
    slots = m.prepare_load(K[:2])
    assert len(set(slots)) == 2
    m.complete_load(K[:2])
    assert stored(m, K[:3]) == []  # already held: nothing to store again
    assert m.take_events() == [TierEvent(k, OffloadTier.HOST, True) for k in K[:3]]


def test_pending_store_is_not_a_hit_and_failed_store_frees_the_slot():
    m = OffloadManager(num_host_slots=1, num_disk_blocks=0)
    [(key, slot)] = m.prepare_store(K[:1])
    assert m.lookup(K[:1]) == (0, 0)
    assert m.prepare_store(K[1:2]) == []  # the only slot is pinned by the pending store
    m.complete_store([key], success=False)
    assert m.prepare_store(K[1:2]) == [(K[1], slot)]


def test_host_eviction_spills_to_disk_and_promotion_brings_it_back():
    m = OffloadManager(num_host_slots=2, num_disk_blocks=10)
    stored(m, K[:2])
    m.take_events()
    planned = stored(m, K[2:3])  # evicts K[0], the least recently used
    plan = m.take_plan()
    assert plan.spills == [(K[0], planned[0][1], "")]  # spilled from the slot it reuses
    assert m.lookup(K[:3]) == (0, 0)  # K[0] is on neither tier until the spill completes
    m.complete_spill([K[0]])
    assert m.lookup(K[:3]) == (0, 3)
    assert m.prepare_promote(K[:1]) == 1
    assert m.is_promoting(K[0])
    promote = m.take_plan().promotes
    assert [k for k, _ in promote] == [K[0]]
    m.complete_promote([K[0]])
    assert m.lookup(K[:1]) == (1, 1)
    events = m.take_events()
    assert (
        TierEvent(K[0], OffloadTier.HOST, False) in events
        and TierEvent(K[0], OffloadTier.DISK, True) in events
    )


def test_failed_promotion_forgets_the_disk_chunk():
    m = OffloadManager(num_host_slots=2, num_disk_blocks=10)
    m.add_disk_blocks((k, "") for k in K[:2])
    assert m.lookup(K[:2]) == (0, 2)
    assert m.prepare_promote(K[:2]) == 2
    m.complete_promote([K[0]], success=False)  # the file failed validation
    m.complete_promote([K[1]])
    assert m.lookup(K[:2]) == (0, 0)
    assert m.lookup(K[1:2]) == (1, 1)
    assert m.num_on_disk() == 1


def test_pinned_chunks_are_never_evicted():
    m = OffloadManager(num_host_slots=2, num_disk_blocks=0)
    stored(m, K[:2])
    m.prepare_load(K[:2])  # both pinned by a load
    assert m.prepare_store(K[2:3]) == []
    m.complete_load(K[:1])
    assert [k for k, _ in m.prepare_store(K[2:3])] == [K[2]]
    assert m.lookup(K[:1]) == (0, 0) and m.lookup(K[1:2]) == (1, 1)


def test_disk_tier_evicts_least_recent_and_deletes_files():
    m = OffloadManager(num_host_slots=1, num_disk_blocks=2)
    deleted = []
    for i in range(4):  # each store evicts the previous chunk to disk
        stored(m, K[i : i + 1])
        plan = m.take_plan()
        deleted += plan.deletes
        for key, _, _ in plan.spills:
            m.complete_spill([key])
    # K[0], K[1], K[2] spilled in turn; the disk tier keeps the last two
    assert sorted(m.disk_keys()) == sorted(K[1:3])
    assert deleted == [K[0]]
    assert m.lookup(K[3:4]) == (1, 1)


def test_host_tier_needs_a_chunk():
    with pytest.raises(ValueError, match="at least one block"):
        OffloadManager(num_host_slots=0, num_disk_blocks=0)


def test_promoting_the_chunk_a_full_disk_would_evict_to_make_room():
    """Room for the promoted chunk's host slot spills the host chunk to a full disk tier, whose
    least recent chunk is the one being promoted: it must stay (pinned), not be evicted."""
    manager = OffloadManager(num_host_slots=1, num_disk_blocks=1)
    a, b = b"a" * 32, b"b" * 32
    manager.prepare_store([a])
    manager.take_plan()
    manager.complete_store([a])
    manager.prepare_store([b])  # evicts a from host: spilled to disk
    manager.take_plan()
    manager.complete_store([b])
    manager.complete_spill([a])
    assert manager.prepare_promote([a]) == 1
    plan = manager.take_plan()
    assert [key for key, _ in plan.promotes] == [a]
    assert a not in plan.deletes
    manager.complete_promote([a])
    assert manager.lookup([a]) == (1, 1)  # in host now (and still on disk)
