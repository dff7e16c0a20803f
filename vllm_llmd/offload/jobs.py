"""Typed tier jobs of one engine step, and the tally of their completions.

The scheduler half plans jobs (`StoreJob`, `SpillJob`, `PromoteJob`, `OffloadLoadSpec`) and
ships them to every worker in `OffloadStepSpec`; each worker answers with a `JobTally`: per job
kind and key, how many workers finished it and how many failed it. vLLM sums the workers'
tallies (`JobTally.merge`), and a tier completes a job once every worker reported it
(`JobTally.take_settled`). The shared tier's stores are reported in the same tally
(`JobKind.SHARED_STORE`, keyed by `SharedStoreSpec.key`).

All of it is plain frozen dataclasses, enums, bytes and ints: vLLM ships them between its
processes itself, inside `SchedulerOutput` and `KVConnectorOutput`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum

Key = bytes


class JobKind(Enum):
    """What a reported job did."""

    STORE = "store"  # device block -> host slot
    SPILL = "spill"  # evicted host slot -> disk file
    PROMOTE = "promote"  # disk file -> host slot (validated)
    SHARED_STORE = "shared_store"  # prompt chunks -> the LMCache server


@dataclass(frozen=True, slots=True)
class StoreJob:
    """Copy a block computed this step from the device cache into a host slot."""

    key: Key
    block_id: int
    slot: int


@dataclass(frozen=True, slots=True)
class SpillJob:
    """Write an evicted host slot to disk; it is copied out before anything reuses the slot."""

    key: Key
    slot: int
    # the chunk's ChunkInfo text, written into its file
    info: str


@dataclass(frozen=True, slots=True)
class PromoteJob:
    """Read (and validate) a disk chunk into a host slot."""

    key: Key
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
    # disk chunks evicted from the disk tier: their files are deleted
    deletes: tuple[Key, ...] = ()

    def is_empty(self) -> bool:
        return not (self.spills or self.promotes or self.stores or self.deletes)


@dataclass
class JobTally:
    """Per job kind and key: [workers that finished it, workers that failed it]."""

    counts: dict[JobKind, dict[Key, list[int]]] = field(default_factory=dict)

    def record(self, kind: JobKind, key: Key, ok: bool) -> None:
        self.add(kind, key, int(ok), int(not ok))

    def add(self, kind: JobKind, key: Key, succeeded: int, failed: int) -> None:
        counts = self.counts.setdefault(kind, {}).setdefault(key, [0, 0])
        counts[0] += succeeded
        counts[1] += failed

    def merge(self, other: JobTally) -> JobTally:
        """Add other's reports to this tally (vLLM's aggregation over workers); returns self."""
        for kind, key, succeeded, failed in other:
            self.add(kind, key, succeeded, failed)
        return self

    def __iter__(self) -> Iterator[tuple[JobKind, Key, int, int]]:
        """(kind, key, succeeded, failed) of every reported job."""
        for kind, per_key in self.counts.items():
            for key, (succeeded, failed) in per_key.items():
                yield kind, key, succeeded, failed

    def of(self, kind: JobKind) -> JobTally:
        """The reports of one kind (a view of this tally: read it, do not change it)."""
        return JobTally({kind: self.counts[kind]} if kind in self.counts else {})

    def totals(self, kind: JobKind) -> tuple[int, int]:
        """(succeeded, failed) summed over the keys of one kind."""
        per_key = self.counts.get(kind, {}).values()
        return sum(ok for ok, _ in per_key), sum(failed for _, failed in per_key)

    def take_settled(self, num_workers: int) -> list[tuple[JobKind, Key, bool]]:
        """Drain the jobs every worker reported: (kind, key, no worker failed it)."""
        settled = []
        for kind, key, succeeded, failed in list(self):
            if succeeded + failed >= num_workers:
                del self.counts[kind][key]
                settled.append((kind, key, failed == 0))
        self.counts = {kind: per_key for kind, per_key in self.counts.items() if per_key}
        return settled

    def is_empty(self) -> bool:
        return not any(self.counts.values())
