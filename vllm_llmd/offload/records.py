"""The plain records the offload index speaks in: what it holds per block (`BlockEntry`), the
tier work of a step (`StepPlan`, `PlannedStore`, `PlannedLoad`) and what it announces
(`TierEvent`). `manager` owns the state machine over them; the planner and the event encoder
read them."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple

from vllm_llmd.hashing import BlockHash


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
    # the staging slot a store straight to disk writes from (no host slot); None otherwise
    staging_slot: int | None = None
    # the disk file's payload is known good: written by this process, or read back whole
    verified: bool = False
    # the disk file is being read back to verify it
    verifying: bool = False
    # what the block holds (tokens, parent hash), as text: written into its disk file and
    # carried by its tier events
    info: str = ""
    # False for a file found at start-up until its header is read: its tokens are unknown, so
    # it was not announced, and neither is its removal
    described: bool = True
    # loads reading it + the store writing it; evictable only at 0
    pins: int = 0


@dataclass
class StepPlan:
    """One step's tier work, in the order the worker must run it."""

    # (key, host slot, info) -> disk, for evicted blocks not yet on disk: copied out first
    spills: list[tuple[BlockHash, int, str]] = field(default_factory=list)
    # disk files found at start-up to read back whole (validated) before they count as hits
    verifies: list[BlockHash] = field(default_factory=list)
    # disk files to delete (disk tier evictions)
    deletes: list[BlockHash] = field(default_factory=list)


class OffloadTier(str, enum.Enum):
    """Where an offloaded block is held (a KV event's medium: `connector/tier_events.py`)."""

    HOST = "host"
    DISK = "disk"


class PlannedStore(NamedTuple):
    """A store `prepare_store` planned: into host slot `slot`, or (`to_disk`) straight to disk
    through staging slot `slot`."""

    key: BlockHash
    slot: int
    to_disk: bool = False


class PlannedLoad(NamedTuple):
    """Where each key of a load comes from: a host slot, or (slot None) its disk file."""

    key: BlockHash
    host_slot: int | None


@dataclass(frozen=True)
class TierEvent:
    """A block entered or left a tier (for KV events and counters)."""

    key: BlockHash
    tier: OffloadTier
    stored: bool  # False: removed
    info: str = ""
