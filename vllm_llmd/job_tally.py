"""What every tier reports its step jobs with: `JobKind` and the tally `JobTally`.

Each worker answers a step's jobs (offload stores, spills and verifications, shared-tier stores)
with a `JobTally`: per job kind and key, how many workers finished it and how many failed it.
vLLM sums the workers' tallies (`JobTally.merge`, from `LLMDWorkerMetadata.aggregate`), and a
tier completes a job once every worker reported it (`JobTally.take_settled`). It lives below
the tiers (`vllm_llmd.offload`, `vllm_llmd.shared_tier`) and the connector that carries it.

Plain dataclasses, enums, bytes and ints: vLLM ships them between its processes itself,
inside `KVConnectorOutput`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum


class JobKind(Enum):
    """What a reported job did."""

    STORE = "store"  # device block -> host slot
    SPILL = "spill"  # evicted host slot, or staging slot of a store straight to disk -> disk file
    VERIFY = "verify"  # a disk file found at start-up, read back whole (validated)
    DISK_READ = "disk_read"  # a disk file read into the device cache by a load (validated)
    SHARED_STORE = "shared_store"  # prompt chunks -> the LMCache server


@dataclass
class JobTally:
    """Per job kind and key: [workers that finished it, workers that failed it].

    A job's key is the block hash of an offload job, `SharedStoreSpec.key` of a shared store."""

    counts: dict[JobKind, dict[bytes, list[int]]] = field(default_factory=dict)

    def record(self, kind: JobKind, key: bytes, ok: bool) -> None:
        self.add(kind, key, int(ok), int(not ok))

    def add(self, kind: JobKind, key: bytes, succeeded: int, failed: int) -> None:
        counts = self.counts.setdefault(kind, {}).setdefault(key, [0, 0])
        counts[0] += succeeded
        counts[1] += failed

    def merge(self, other: JobTally) -> JobTally:
        """Add other's reports to this tally (vLLM's aggregation over workers); returns self."""
        for kind, key, succeeded, failed in other:
            self.add(kind, key, succeeded, failed)
        return self

    def __iter__(self) -> Iterator[tuple[JobKind, bytes, int, int]]:
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

    def take_settled(self, num_workers: int) -> list[tuple[JobKind, bytes, bool]]:
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
