"""Scheduler side of the offload tiers: which block is where, and what each step must move.

Pure bookkeeping: no tensors, no files. The worker half moves the bytes and reports back; this
index changes only through the verb pairs below, so it is the one owner of "what is where".

An offloaded block is one vLLM block (all layers) keyed by its block hash. It lives in the host
tier (a slot of the host pool), on disk, or both:

    prepare_store   ──▶ storing (pinned) ──complete_store──▶ in host (evictable)
    prepare_promote ──▶ disk → host read (pinned) ──complete_promote──▶ in host | forgotten
    host full: LRU victim ──▶ spill to disk (if it is not there yet) ──complete_spill──▶ on disk
    disk full: LRU victim ──▶ deleted
    prepare_load    ──▶ pinned (host → device) ──complete_load──▶ unpinned

Loads into the device cache always read the host tier: a disk hit is first promoted to host,
and the worker validates the file on the way (a file that fails is deleted and becomes a miss,
never an error). A pinned block is never evicted: nothing is freed while a copy reads or writes
it. A slot freed by an eviction is reused in the same step only after the worker copied the
victim out: the worker runs a step's spills first (`StepPlan` order).
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from vllm_llmd.hashing import BlockHash
from vllm_llmd.offload.policy import CachePolicy, make_policy


@dataclass(slots=True)
class BlockEntry:
    key: BlockHash
    # slot in the host pool; None when the block is not (or no longer) in host memory
    host_slot: int | None = None
    # the host copy is complete and readable
    in_host: bool = False
    # the disk file is complete and readable
    on_disk: bool = False
    # the disk file is being written
    spilling: bool = False
    # the disk file is being read into host_slot
    promoting: bool = False
    # what the block holds (tokens, parent hash), as text: written into its disk file and
    # carried by its tier events
    info: str = ""
    # loads reading it + the store writing it; evictable only at 0
    pins: int = 0


@dataclass
class StepPlan:
    """One step's tier work, in the order the worker must run it."""

    # (key, host slot, info) -> disk, for evicted blocks not yet on disk: copied out first
    spills: list[tuple[BlockHash, int, str]] = field(default_factory=list)
    # disk -> host slot (validated on the way)
    promotes: list[tuple[BlockHash, int]] = field(default_factory=list)
    # disk files to delete (disk tier evictions)
    deletes: list[BlockHash] = field(default_factory=list)


class OffloadTier(str, enum.Enum):
    """Where an offloaded block is held (a KV event's medium: `connector/tier_events.py`)."""

    HOST = "host"
    DISK = "disk"


@dataclass(frozen=True)
class TierEvent:
    """A block entered or left a tier (for KV events and counters)."""

    key: BlockHash
    tier: OffloadTier
    stored: bool  # False: removed
    info: str = ""


class OffloadManager:
    """Index of the host and disk tiers, sized in blocks."""

    def __init__(self, num_host_slots: int, num_disk_blocks: int, policy: str = "lru") -> None:
        if num_host_slots <= 0:
            raise ValueError(f"the host tier needs at least one block, got {num_host_slots}")
        self.num_host_slots = num_host_slots
        self.num_disk_blocks = num_disk_blocks
        self._entries: dict[BlockHash, BlockEntry] = {}
        self._free_slots = list(range(num_host_slots - 1, -1, -1))
        self._host_policy: CachePolicy = make_policy(policy)
        self._disk_policy: CachePolicy = make_policy(policy)
        self._events: list[TierEvent] = []
        self._plan = StepPlan()
        self._num_spilling = 0
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

    def is_promoting(self, key: BlockHash) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry.promoting

    # ---- loads ---------------------------------------------------------------------------

    def prepare_load(self, keys: Sequence[BlockHash]) -> list[int]:
        """Pin host-resident keys for a host → device load; returns their host slots."""
        slots = []
        for key in keys:
            entry = self._entries[key]
            assert entry.in_host and entry.host_slot is not None, (
                f"load of a block not in host memory: {key.hex()}"
            )
            entry.pins += 1
            self._host_policy.touch(key)
            slots.append(entry.host_slot)
        return slots

    def complete_load(self, keys: Iterable[BlockHash]) -> None:
        for key in keys:
            self._entries[key].pins -= 1

    def prepare_promote(self, keys: Sequence[BlockHash]) -> int:
        """Plan disk → host reads for disk-only keys; returns how many were planned."""
        planned = 0
        for key in keys:
            entry = self._entries.get(key)
            if entry is None or not entry.on_disk or entry.in_host or entry.promoting:
                break
            # Pin first: making room for the slot spills a host block to disk, and a full
            # disk tier then evicts its least recent block, which may be this very one.
            entry.pins += 1
            slot = self._take_slot()
            if slot is None:
                entry.pins -= 1
                break
            entry.host_slot, entry.promoting = slot, True
            self._disk_policy.touch(key)
            self._plan.promotes.append((key, slot))
            planned += 1
        return planned

    def complete_promote(self, keys: Iterable[BlockHash], success: bool = True) -> None:
        """A promoted block joins the host tier; one that failed validation is forgotten."""
        for key in keys:
            entry = self._entries[key]
            entry.promoting, entry.pins = False, entry.pins - 1
            if success:
                entry.in_host = True
                self._host_policy.insert(key)
                self._emit(TierEvent(key, OffloadTier.HOST, True, entry.info))
            else:  # the worker deleted the file
                self._release_slot(entry)
                if entry.on_disk:
                    entry.on_disk = False
                    self._disk_policy.remove(key)
                    self._emit(TierEvent(key, OffloadTier.DISK, stored=False))
            self._forget_if_gone(entry)

    # ---- stores --------------------------------------------------------------------------

    def prepare_store(
        self, keys: Sequence[BlockHash], infos: Sequence[str] | None = None
    ) -> list[tuple[BlockHash, int]]:
        """Plan host stores for keys no tier holds or is storing; evict and spill for room.

        infos: each key's description (see BlockEntry.info). Returns the (key, host slot) pairs
        planned, in order.
        """
        planned = []
        for i, key in enumerate(keys):
            entry = self._entries.get(key)
            if entry is not None:
                if entry.in_host:
                    self._host_policy.touch(key)
                if entry.host_slot is not None or entry.on_disk or entry.spilling:
                    continue
            slot = self._take_slot()
            if slot is None:
                break  # every host block is pinned: store nothing more this step
            entry = self._entries.setdefault(key, BlockEntry(key))
            entry.host_slot, entry.pins = slot, entry.pins + 1
            if infos is not None:
                entry.info = infos[i]
            planned.append((key, slot))
        return planned

    def take_plan(self) -> StepPlan:
        """Drain this step's evictions and promotions for the worker (stores are returned by
        prepare_store: the caller adds their device blocks)."""
        plan, self._plan = self._plan, StepPlan()
        return plan

    def complete_store(self, keys: Iterable[BlockHash], success: bool = True) -> None:
        for key in keys:
            entry = self._entries[key]
            entry.pins -= 1
            if success:
                entry.in_host = True
                self._host_policy.insert(key)
                self._emit(TierEvent(key, OffloadTier.HOST, True, entry.info))
            else:
                self._release_slot(entry)
                self._forget_if_gone(entry)

    def complete_spill(self, keys: Iterable[BlockHash], success: bool = True) -> None:
        for key in keys:
            entry = self._entries[key]
            entry.spilling = False
            self._num_spilling -= 1
            if success:
                entry.on_disk = True
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
        self._emit(TierEvent(victim, OffloadTier.HOST, stored=False))
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
            self._emit(TierEvent(victim, OffloadTier.DISK, stored=False))
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
        """Blocks (key, info) found on disk at start-up, oldest first, readable at once."""
        for key, info in blocks:
            entry = self._entries.setdefault(key, BlockEntry(key, info=info))
            if not entry.on_disk:
                entry.on_disk = True
                self._disk_policy.insert(key)
                self._emit(TierEvent(key, OffloadTier.DISK, True, info))

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

    def _emit(self, event: TierEvent) -> None:
        self._events.append(event)
        self.version += 1

    def take_events(self) -> list[TierEvent]:
        events, self._events = self._events, []
        return events

    def num_pinned(self) -> int:
        """Blocks a copy (load, store or promotion) still uses: 0 when no copy is running."""
        return sum(1 for entry in self._entries.values() if entry.pins)

    def num_in_host(self) -> int:
        return len(self._host_policy)

    def num_on_disk(self) -> int:
        return len(self._disk_policy)

    def host_keys(self) -> list[BlockHash]:
        return [k for k, e in self._entries.items() if e.in_host]

    def disk_keys(self) -> list[BlockHash]:
        return [k for k, e in self._entries.items() if e.on_disk]
