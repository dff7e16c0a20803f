"""Typed offload jobs of one engine step.

The scheduler half plans jobs (`StoreJob`, `DiskStoreJob`, `SpillJob`, `OffloadLoadSpec`, file
verifications) and ships them to every worker in `OffloadStepSpec`; each worker answers with a
`vllm_llmd.job_tally.JobTally` (per job kind and block hash: workers that finished it, workers
that failed it), the tally the shared tier reports its stores with too.

All of it is plain frozen dataclasses, bytes and ints: vLLM ships them between its processes
itself, inside `SchedulerOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_llmd.hashing import BlockHash


@dataclass(frozen=True, slots=True)
class StoreJob:
    """Copy a block computed this step from the device cache into a host slot."""

    key: BlockHash
    block_id: int
    slot: int


@dataclass(frozen=True, slots=True)
class SpillJob:
    """Write an evicted host slot to disk; it is copied out before anything reuses the slot."""

    key: BlockHash
    slot: int
    # the block's BlockInfo text, written into its file
    info: str


@dataclass(frozen=True, slots=True)
class DiskStoreJob:
    """Write a block computed this step straight to disk, through a staging slot (every host
    slot was pinned): copied out of the device cache before the next step, like a store."""

    key: BlockHash
    block_id: int
    staging_slot: int
    # the block's BlockInfo text, written into its file
    info: str


@dataclass(frozen=True)
class OffloadLoadSpec:
    """Offload: load a request's hit into its device blocks: `block_ids[i]` from host slot
    `slots[i]`, `disk_block_ids[i]` from the disk file of `disk_keys[i]`."""

    request_id: str
    block_ids: tuple[int, ...]
    slots: tuple[int, ...]
    disk_block_ids: tuple[int, ...] = ()
    disk_keys: tuple[BlockHash, ...] = ()

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids) + len(self.disk_block_ids)


@dataclass(frozen=True)
class OffloadStepSpec:
    """Offload tier work of one step, run by each worker in this order."""

    spills: tuple[SpillJob, ...] = ()
    # disk files found at start-up to read back whole (validated): a bad one is deleted
    verifies: tuple[BlockHash, ...] = ()
    stores: tuple[StoreJob, ...] = ()
    disk_stores: tuple[DiskStoreJob, ...] = ()
    # disk blocks evicted from the disk tier: their files are deleted
    deletes: tuple[BlockHash, ...] = ()
    # computed blocks of requests that ended before any slot could take them (counted by the
    # first worker: the scheduler half has no metrics of its own)
    num_dropped: int = 0
    # the stores still in flight must finish before this step's forward: a request with stores
    # in flight ended or was preempted, so vLLM may hand its device blocks to another request.
    # Otherwise stores run on behind the steps (a request's own blocks stay until it ends).
    flush_first: bool = False

    def is_empty(self) -> bool:
        return not (self.spills or self.verifies or self.stores or self.disk_stores or self.deletes)
