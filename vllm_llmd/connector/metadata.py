"""Typed messages between the connector's halves.

The scheduler half builds one `LLMDConnectorMetadata` per engine step; vLLM ships it to every
worker inside `SchedulerOutput`, and the worker half executes it. Each worker answers with
`LLMDWorkerMetadata` (a `vllm_llmd.job_tally.JobTally` of the tier jobs that ended). Each
tier's jobs are its own typed classes (`vllm_llmd/offload/jobs.py`,
`vllm_llmd/shared_tier/messages.py`); P/D's are here.
Request ids are vLLM's engine-internal ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)

from vllm_llmd.job_tally import JobTally
from vllm_llmd.kv_layout import KVLayoutFingerprint
from vllm_llmd.offload.jobs import OffloadLoadSpec, OffloadStepSpec
from vllm_llmd.shared_tier.messages import SharedLoadSpec, SharedStoreSpec


@dataclass(frozen=True)
class SendSpec:
    """Prefill side: hold these blocks of a finished request for a decode instance's pull."""

    request_id: str
    transfer_id: str
    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class RecvSpec:
    """Decode side: pull remote blocks into local blocks (same length, same order)."""

    request_id: str
    host: str
    # side-channel port of each prefill TP rank; worker rank r pulls from ports[r]
    ports: tuple[int, ...]
    transfer_id: str
    fingerprint: KVLayoutFingerprint
    remote_block_ids: tuple[int, ...]
    local_block_ids: tuple[int, ...]
    # prompt tokens this pull loads (vLLM's num_external_tokens)
    num_tokens: int


@dataclass(frozen=True)
class ReleaseSpec:
    """Decode side: free a prefill's held blocks without reading them."""

    host: str
    ports: tuple[int, ...]
    transfer_id: str
    reason: str


@dataclass
class LLMDConnectorMetadata(KVConnectorMetadata):
    """What the worker half must do in one engine step."""

    sends: list[SendSpec] = field(default_factory=list)
    recvs: list[RecvSpec] = field(default_factory=list)
    releases: list[ReleaseSpec] = field(default_factory=list)
    offload_loads: list[OffloadLoadSpec] = field(default_factory=list)
    offload_step: OffloadStepSpec = field(default_factory=OffloadStepSpec)
    shared_loads: list[SharedLoadSpec] = field(default_factory=list)
    shared_stores: list[SharedStoreSpec] = field(default_factory=list)
    # vLLM scheduled no tokens this step: the worker may wait for its transfers to end
    idle_step: bool = False

    def is_empty(self) -> bool:
        return not (
            self.sends
            or self.recvs
            or self.releases
            or self.offload_loads
            or not self.offload_step.is_empty()
            or self.shared_loads
            or self.shared_stores
        )


@dataclass
class LLMDWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker → scheduler each step: the tier jobs that ended on this worker (vLLM sums the
    workers' reports with `aggregate`)."""

    results: JobTally = field(default_factory=JobTally)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> LLMDWorkerMetadata:
        assert isinstance(other, LLMDWorkerMetadata), type(other)
        self.results.merge(other.results)
        return self


@dataclass
class LLMDHandshake(KVConnectorHandshakeMetadata):
    """Worker → scheduler at start-up: where this worker's side channel listens."""

    tp_rank: int
    side_channel_port: int | None
