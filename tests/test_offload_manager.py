"""OffloadManager: the tiers' bookkeeping walked through every path, no tensors involved."""

from __future__ import annotations

import pytest

from vllm_llmd.offload.manager import OffloadManager
from vllm_llmd.offload.records import OffloadTier, PlannedLoad, PlannedStore, TierEvent

K = [bytes([i]) * 32 for i in range(20)]


def stored(manager, keys):
    planned, _ = manager.prepare_store(keys)
    manager.complete_store([p.key for p in planned])
    return planned


def test_store_then_lookup_and_load_from_host():
    m = OffloadManager(num_host_slots=4, num_disk_blocks=0)
    assert [p.key for p in stored(m, K[:3])] == K[:3]
    assert m.lookup(K[:4]) == (3, 3)
    assert m.lookup(K[1:3]) == (2, 2)
    loads = m.prepare_load(K[:2])
    assert len({load.host_slot for load in loads}) == 2 and None not in loads
    m.complete_load(K[:2])
    assert stored(m, K[:3]) == []  # already held: nothing to store again
    assert m.take_events() == [TierEvent(k, OffloadTier.HOST, True) for k in K[:3]]


def test_pending_store_is_not_a_hit_and_failed_store_frees_the_slot():
    m = OffloadManager(num_host_slots=1, num_disk_blocks=0)
    [(key, slot, _)], _ = m.prepare_store(K[:1])
    assert m.lookup(K[:1]) == (0, 0)
    # the only slot is pinned by the pending store, and there is no disk tier to go to
    assert m.prepare_store(K[1:2]) == ([], 0)
    m.complete_store([key], success=False)
    assert m.prepare_store(K[1:2]) == ([PlannedStore(K[1], slot)], 1)


def test_host_eviction_spills_to_disk_and_a_hit_loads_from_the_file():
    m = OffloadManager(num_host_slots=2, num_disk_blocks=10)
    stored(m, K[:2])
    m.take_events()
    planned = stored(m, K[2:3])  # evicts K[0], the least recently used
    plan = m.take_plan()
    assert plan.spills == [(K[0], planned[0].slot, "")]  # spilled from the slot it reuses
    assert m.lookup(K[:3]) == (0, 0)  # K[0] is on neither tier until the spill completes
    m.complete_spill([K[0]])
    assert m.lookup(K[:3]) == (0, 3)
    assert m.unverified(K[:3]) == []  # written by this process: trusted
    # The whole run loads: K[0] from its file, the others from their host slots.
    loads = m.prepare_load(K[:3])
    assert loads[0] == PlannedLoad(K[0], None) and None not in [p.host_slot for p in loads[1:]]
    assert m.take_plan().verifies == [] and m.num_pinned() == 3
    m.complete_load(K[:3])
    assert m.num_pinned() == 0
    events = m.take_events()
    assert (
        TierEvent(K[0], OffloadTier.HOST, False) in events
        and TierEvent(K[0], OffloadTier.DISK, True) in events
    )


def test_files_found_at_start_are_read_back_before_they_count():
    m = OffloadManager(num_host_slots=2, num_disk_blocks=10)
    m.add_disk_blocks((k, "") for k in K[:2])
    assert m.lookup(K[:2]) == (0, 2)
    assert m.unverified(K[:2]) == K[:2]
    assert m.prepare_verify(K[:2]) == 2
    assert m.prepare_verify(K[:2]) == 2  # asked again while on their way: not planned twice
    assert m.take_plan().verifies == K[:2]
    m.complete_verify([K[0]], success=False)  # the file failed validation (deleted)
    m.complete_verify([K[1]])
    assert m.lookup(K[:2]) == (0, 0)
    assert m.lookup(K[1:2]) == (0, 1) and m.unverified(K[1:2]) == []
    assert m.num_on_disk() == 1 and m.num_pinned() == 0


def test_a_file_a_load_found_bad_is_forgotten():
    m = OffloadManager(num_host_slots=1, num_disk_blocks=10)
    stored(m, K[:1])
    stored(m, K[1:2])  # evicts K[0]: spilled
    m.complete_spill([k for k, _, _ in m.take_plan().spills])
    assert m.prepare_load(K[:1]) == [PlannedLoad(K[0], None)]
    m.complete_disk_read(K[:1], success=False)  # corrupted after it was written
    m.complete_load(K[:1])
    assert m.lookup(K[:1]) == (0, 0) and m.num_on_disk() == 0 and m.num_pinned() == 0
    assert TierEvent(K[0], OffloadTier.DISK, False) in m.take_events()


def test_with_every_host_slot_pinned_stores_go_straight_to_disk_through_staging():
    m = OffloadManager(num_host_slots=1, num_disk_blocks=10, num_staging_slots=2)
    stored(m, K[:1])
    m.prepare_load(K[:1])  # the only host slot is pinned by a load
    planned, taken = m.prepare_store(K[1:4])
    assert planned == [PlannedStore(K[1], 0, True), PlannedStore(K[2], 1, True)]
    assert taken == 2  # K[3] found no slot: offered again
    assert m.num_staging_in_use() == 2 and m.lookup(K[1:3]) == (0, 0)
    m.complete_spill([K[1]])
    m.complete_spill([K[2]], success=False)  # the write failed: K[2] is on no tier
    assert m.lookup(K[1:3]) == (0, 1) and m.num_staging_in_use() == 0
    [store], taken = m.prepare_store(K[3:4])
    assert store.key == K[3] and store.to_disk and taken == 1
    events = m.take_events()
    assert TierEvent(K[1], OffloadTier.DISK, True) in events
    assert not [e for e in events if e.key == K[2]]


def test_without_a_disk_tier_there_is_no_staging():
    m = OffloadManager(num_host_slots=1, num_disk_blocks=0, num_staging_slots=4)
    stored(m, K[:1])
    m.prepare_load(K[:1])
    assert m.prepare_store(K[1:2]) == ([], 0)


def test_pinned_chunks_are_never_evicted():
    m = OffloadManager(num_host_slots=2, num_disk_blocks=0)
    stored(m, K[:2])
    m.prepare_load(K[:2])  # both pinned by a load
    assert m.prepare_store(K[2:3]) == ([], 0)
    m.complete_load(K[:1])
    assert [p.key for p in m.prepare_store(K[2:3])[0]] == [K[2]]
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


def test_a_disk_block_being_loaded_is_not_evicted_to_make_room():
    """A spill into a full disk tier evicts its least recent block, unless a load reads it."""
    manager = OffloadManager(num_host_slots=1, num_disk_blocks=1)
    a, b, c = b"a" * 32, b"b" * 32, b"c" * 32
    stored(manager, [a])
    stored(manager, [b])  # evicts a from host: spilled to disk
    manager.complete_spill([key for key, _, _ in manager.take_plan().spills])
    assert manager.prepare_load([a]) == [PlannedLoad(a, None)]
    stored(manager, [c])  # evicts b from host: the disk is full, and a is being read
    plan = manager.take_plan()
    assert [key for key, _, _ in plan.spills] == [b] and a not in plan.deletes
    manager.complete_load([a])
    assert manager.lookup([a]) == (0, 1)
