"""Scheduler side of the offload tiers: which block is where, and what each step must move.

Pure bookkeeping: no tensors, no files. The worker half moves the bytes and reports back; this
index changes only through the verb pairs below, so it is the one owner of "what is where".

An offloaded block is one vLLM block (all layers) keyed by its block hash. It lives in the host
tier (a slot of the host pool), on disk, or both:

    prepare_store ──▶ storing into a host slot (pinned) ──complete_store──▶ in host (evictable)
                  └─▶ no host slot free (all pinned): straight to disk through a staging slot
                      ──complete_spill──▶ on disk
    host full: LRU victim ──▶ spill to disk (if it is not there yet) ──complete_spill──▶ on disk
    disk full: LRU victim ──▶ deleted
    prepare_verify ──▶ a file found at start-up read back whole ──complete_verify──▶ usable
    prepare_load  ──▶ pinned (host → device, or disk → device) ──complete_load──▶ unpinned

A disk hit loads straight into the device cache (the worker reads it in pieces through a buffer of
its own), so how much of a prompt comes back from disk does not depend on the host tier's size.
Files this process wrote are trusted; a file found at start-up (listed by name; its header is read
in the background, `describe_disk_blocks`) is read back and validated once before it counts as a
hit, so one that fails is a miss, never a failed load. A pinned block is never evicted: nothing is
freed while a copy reads or writes it. A slot freed by an eviction is reused in the same step only
after the worker copied the victim out: the worker runs a step's spills first (`StepPlan` order).

A store is dropped only when neither a host slot nor a staging slot is free: the caller offers
the rest again next step (`prepare_store` says how many keys it took).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

from vllm_llmd.hashing import BlockHash
from vllm_llmd.offload.policy import CachePolicy, make_policy
from vllm_llmd.offload.records import (
    BlockEntry,
    OffloadTier,
    PlannedLoad,
    PlannedStore,
    StepPlan,
    TierEvent,
)


class OffloadManager:
    """Index of the host and disk tiers, sized in blocks."""

    def __init__(
        self,
        num_host_slots: int,
        num_disk_blocks: int,
        policy: str = "lru",
        num_staging_slots: int = 0,
    ) -> None:
        if num_host_slots <= 0:
            raise ValueError(f"the host tier needs at least one block, got {num_host_slots}")
        self.num_host_slots = num_host_slots
        self.num_disk_blocks = num_disk_blocks
        self.num_staging_slots = num_staging_slots if num_disk_blocks > 0 else 0
        self._entries: dict[BlockHash, BlockEntry] = {}
        self._free_slots = list(range(num_host_slots - 1, -1, -1))
        self._free_staging = list(range(self.num_staging_slots - 1, -1, -1))
        self._host_policy: CachePolicy = make_policy(policy)
        self._disk_policy: CachePolicy = make_policy(policy)
        self._events: list[TierEvent] = []
        self._plan = StepPlan()
        self._num_spilling = 0
        # the sum of every entry's pins (num_pins)
        self._num_pins = 0
        # bumped by every change of what the tiers hold
        self.version = 0

    # ---- lookups -------------------------------------------------------------------------

    def lookup(self, keys: Sequence[BlockHash]) -> tuple[int, int]:
        """(leading keys readable from host, leading keys readable from host or disk)."""
        in_host = sum(1 for _ in itertools.takewhile(self._in_host, keys))
        anywhere = in_host + sum(1 for _ in itertools.takewhile(self._readable, keys[in_host:]))
        return in_host, anywhere

    def _in_host(self, key: BlockHash) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry.in_host

    def _readable(self, key: BlockHash) -> bool:
        entry = self._entries.get(key)
        return entry is not None and (entry.in_host or entry.on_disk)

    def unverified(self, keys: Sequence[BlockHash]) -> list[BlockHash]:
        """The keys held only on disk whose files were not read back yet (found at start-up)."""
        unverified = []
        for key in keys:
            entry = self._entries[key]
            if not entry.in_host and entry.on_disk and not entry.verified:
                unverified.append(key)
        return unverified

    # ---- loads ---------------------------------------------------------------------------

    def prepare_load(self, keys: Sequence[BlockHash]) -> list[PlannedLoad]:
        """Pin readable keys for a load into the device cache: from their host slot when in
        host memory, else from their (verified) disk file."""
        planned = []
        for key in keys:
            entry = self._entries[key]
            entry.pins += 1
            self._num_pins += 1
            if entry.in_host and entry.host_slot is not None:
                self._host_policy.touch(key)
                planned.append(PlannedLoad(key, entry.host_slot))
            else:
                assert entry.on_disk and entry.verified, f"load of an unheld block {key.hex()}"
                self._disk_policy.touch(key)
                planned.append(PlannedLoad(key, None))
        return planned

    def complete_load(self, keys: Iterable[BlockHash]) -> None:
        for key in keys:
            entry = self._entries[key]
            entry.pins -= 1
            self._num_pins -= 1
            self._forget_if_gone(entry)

    def prepare_verify(self, keys: Sequence[BlockHash]) -> int:
        """Plan read-backs of unverified disk files; returns how many are (now) being verified."""
        verifying = 0
        for key in keys:
            entry = self._entries.get(key)
            if entry is None or not entry.on_disk or entry.verified:
                continue
            if not entry.verifying:
                entry.verifying, entry.pins = True, entry.pins + 1  # not deleted meanwhile
                self._num_pins += 1
                self._plan.verifies.append(key)
            verifying += 1
        return verifying

    def complete_verify(self, keys: Iterable[BlockHash], success: bool = True) -> None:
        """A verified file counts as a hit from now on; one that failed was deleted."""
        for key in keys:
            entry = self._entries[key]
            entry.verifying, entry.pins = False, entry.pins - 1
            self._num_pins -= 1
            if success:
                entry.verified = True
            elif entry.on_disk:
                entry.on_disk = False
                self._disk_policy.remove(key)
                self._emit_removed(entry, OffloadTier.DISK)
            self._forget_if_gone(entry)

    def complete_disk_read(self, keys: Iterable[BlockHash], success: bool = True) -> None:
        """A load read these keys' files; one that failed (corrupted, or deleted behind our
        back) is on disk no longer, so the next hit does not fail the same way."""
        if success:
            return
        for key in keys:
            entry = self._entries.get(key)
            if entry is None or not entry.on_disk:
                continue
            entry.on_disk = entry.verified = False
            self._disk_policy.remove(key)
            self._emit_removed(entry, OffloadTier.DISK)
            self._forget_if_gone(entry)

    # ---- stores --------------------------------------------------------------------------

    def prepare_store(
        self, keys: Sequence[BlockHash], infos: Sequence[str] | None = None
    ) -> tuple[list[PlannedStore], int]:
        """Plan stores for keys no tier holds or is storing: into host slots (evicting and
        spilling for room), else, when every host slot is pinned, straight to disk through a
        staging slot.

        infos: each key's description (see BlockEntry.info). Returns the stores planned, in
        order, and how many leading keys were taken care of (planned, or already held): the
        others found no slot and are to be offered again.
        """
        planned: list[PlannedStore] = []
        for i, key in enumerate(keys):
            entry = self._entries.get(key)
            if entry is not None:
                if entry.in_host:
                    self._host_policy.touch(key)
                if entry.host_slot is not None or entry.on_disk or entry.spilling:
                    continue
            slot = self._take_slot()
            to_disk = slot is None
            if to_disk:
                slot = self._free_staging.pop() if self._free_staging else None
                if slot is None:
                    return planned, i  # every host and staging slot is in use
                self._make_disk_room()
                self._num_spilling += 1
            assert slot is not None
            entry = self._entries.setdefault(key, BlockEntry(key))
            if to_disk:
                entry.staging_slot, entry.spilling = slot, True
            else:
                entry.host_slot, entry.pins = slot, entry.pins + 1
                self._num_pins += 1
            if infos is not None:
                entry.info = infos[i]
            planned.append(PlannedStore(key, slot, to_disk))
        return planned, len(keys)

    def take_plan(self) -> StepPlan:
        """Drain this step's evictions and verifications for the worker (stores are returned by
        prepare_store: the caller adds their device blocks)."""
        plan, self._plan = self._plan, StepPlan()
        return plan

    def complete_store(self, keys: Iterable[BlockHash], success: bool = True) -> None:
        for key in keys:
            entry = self._entries[key]
            entry.pins -= 1
            self._num_pins -= 1
            if success:
                entry.in_host = True
                self._host_policy.insert(key)
                self._emit(TierEvent(key, OffloadTier.HOST, True, entry.info))
            else:
                self._release_slot(entry)
                self._forget_if_gone(entry)

    def complete_spill(self, keys: Iterable[BlockHash], success: bool = True) -> None:
        """A disk write ended: a spill from a host slot, or a store through a staging slot."""
        for key in keys:
            entry = self._entries[key]
            entry.spilling = False
            self._num_spilling -= 1
            if entry.staging_slot is not None:
                self._free_staging.append(entry.staging_slot)
                entry.staging_slot = None
            if success:
                entry.on_disk = entry.verified = True
                self._disk_policy.insert(key)
                self._emit(TierEvent(key, OffloadTier.DISK, True, entry.info))
            self._forget_if_gone(entry)

    def _take_slot(self) -> int | None:
        if self._free_slots:
            return self._free_slots.pop()
        victim = self._host_policy.choose_victim(self._evictable_from_host)
        if victim is None:
            return None
        entry = self._entries[victim]
        slot = entry.host_slot
        assert slot is not None, "an evictable block is in host memory"
        self._host_policy.remove(victim)
        entry.host_slot, entry.in_host = None, False
        self._emit_removed(entry, OffloadTier.HOST)
        if self.num_disk_blocks > 0 and not entry.on_disk:
            self._make_disk_room()
            entry.spilling = True
            self._num_spilling += 1
            self._plan.spills.append((victim, slot, entry.info))
        self._forget_if_gone(entry)
        return slot

    def _make_disk_room(self) -> None:
        while len(self._disk_policy) + self._num_spilling >= self.num_disk_blocks:
            victim = self._disk_policy.choose_victim(self._evictable_from_disk)
            if victim is None:
                return  # every disk block is being read: the disk tier runs over briefly
            entry = self._entries[victim]
            self._disk_policy.remove(victim)
            entry.on_disk = False
            self._plan.deletes.append(victim)
            self._emit_removed(entry, OffloadTier.DISK)
            self._forget_if_gone(entry)

    def _evictable_from_host(self, key: BlockHash) -> bool:
        entry = self._entries[key]
        return entry.in_host and entry.pins == 0

    def _evictable_from_disk(self, key: BlockHash) -> bool:
        return self._entries[key].pins == 0

    def _release_slot(self, entry: BlockEntry) -> None:
        if entry.host_slot is not None:
            self._free_slots.append(entry.host_slot)
            entry.host_slot, entry.in_host = None, False

    def _forget_if_gone(self, entry: BlockEntry) -> None:
        gone = entry.host_slot is None and not entry.on_disk and not entry.spilling
        if gone and not entry.pins:
            del self._entries[entry.key]

    # ---- warm restart, reset, events -----------------------------------------------------

    def add_disk_blocks(self, blocks: Iterable[tuple[BlockHash, str]]) -> None:
        """Blocks (key, info) found on disk at start-up, oldest first (verified before use).
        A block listed without its info ("") is announced when `describe_disk_blocks` gives
        it."""
        for key, info in blocks:
            entry = self._entries.setdefault(key, BlockEntry(key, info=info))
            if not entry.on_disk:
                entry.on_disk = True
                self._disk_policy.insert(key)
                if info:
                    self._emit(TierEvent(key, OffloadTier.DISK, True, info))
                else:
                    entry.described = False

    def describe_disk_blocks(self, checked: Iterable[tuple[BlockHash, str | None]]) -> None:
        """Header checks of blocks found at start-up (`disk_check.StartupHeaderCheck`): a valid
        block's info (announced now), or None for one whose file failed (it leaves the index).
        A block stored again since the start, or read back whole, keeps what that found; one a
        copy is reading is left to that copy, which fails and says so if the file is bad."""
        for key, info in checked:
            entry = self._entries.get(key)
            if entry is None or not entry.on_disk:
                continue  # evicted meanwhile
            if info is not None:
                if not entry.described:
                    entry.info, entry.described = info, True
                    self._emit(TierEvent(key, OffloadTier.DISK, True, info))
            elif not entry.pins and not entry.verified:
                entry.on_disk = entry.verified = False
                self._disk_policy.remove(key)
                self._forget_if_gone(entry)

    def reset(self) -> list[BlockHash]:
        """Forget every block no copy is using (a prefix-cache reset); returns the disk keys
        to delete. Pinned blocks stay until their copies complete."""
        deletes = []
        for entry in list(self._entries.values()):
            if entry.pins or entry.spilling:
                continue
            if entry.in_host:
                self._host_policy.remove(entry.key)
                self._release_slot(entry)
            if entry.on_disk:
                self._disk_policy.remove(entry.key)
                entry.on_disk = False
                deletes.append(entry.key)
            self._forget_if_gone(entry)
        self._plan.deletes.extend(deletes)
        return deletes

    def _emit_removed(self, entry: BlockEntry, tier: OffloadTier) -> None:
        if entry.described:
            self._emit(TierEvent(entry.key, tier, stored=False))

    def _emit(self, event: TierEvent) -> None:
        self._events.append(event)
        self.version += 1

    def take_events(self) -> list[TierEvent]:
        events, self._events = self._events, []
        return events

    def num_pinned(self) -> int:
        """Blocks a copy (load, store or verification) still uses: 0 when none is running."""
        return sum(1 for entry in self._entries.values() if entry.pins)

    def num_pins(self) -> int:
        """Pins the copies in flight hold (a block loaded by two requests counts twice): 0 when
        none is running; kept as a count, cheap enough to report every step."""
        return self._num_pins

    def num_staging_in_use(self) -> int:
        """Staging slots held by stores straight to disk: 0 when none is running."""
        return self.num_staging_slots - len(self._free_staging)

    def num_in_host(self) -> int:
        return len(self._host_policy)

    def num_on_disk(self) -> int:
        return len(self._disk_policy)

    def host_keys(self) -> list[BlockHash]:
        return [k for k, e in self._entries.items() if e.in_host]

    def disk_keys(self) -> list[BlockHash]:
        return [k for k, e in self._entries.items() if e.on_disk]
