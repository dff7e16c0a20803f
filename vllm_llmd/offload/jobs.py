"""Typed offload jobs of one engine step.

The scheduler half plans jobs (`StoreJob`, `SpillJob`, `PromoteJob`, `OffloadLoadSpec`) and
ships them to every worker in `OffloadStepSpec`; each worker answers with a
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
class PromoteJob:
    """Read (and validate) a disk block into a host slot."""

    key: BlockHash
    slot: int


@dataclass(frozen=True)
class OffloadLoadSpec:
    """Offload: copy host-tier slots into a request's device blocks (same order)."""

    request_id: str
    block_ids: tuple[int, ...]
    slots: tuple[int, ...]


@dataclass(frozen=True)
class OffloadStepSpec:
    """Offload tier work of one step, run by each worker in this order."""

    spills: tuple[SpillJob, ...] = ()
    promotes: tuple[PromoteJob, ...] = ()
    stores: tuple[StoreJob, ...] = ()
    # disk blocks evicted from the disk tier: their files are deleted
    deletes: tuple[BlockHash, ...] = ()

    def is_empty(self) -> bool:
        return not (self.spills or self.promotes or self.stores or self.deletes)
