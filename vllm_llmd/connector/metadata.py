"""Typed messages between the connector's halves.

The scheduler half builds one `LLMDConnectorMetadata` per engine step; vLLM ships it to every
worker inside `SchedulerOutput`, and the worker half executes it. Request ids are vLLM's
engine-internal ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)

from vllm_llmd.shared.messages import SharedLoadSpec, SharedStoreSpec
from vllm_llmd.transfer.messages import KVLayoutFingerprint


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


@dataclass(frozen=True)
class OffloadLoadSpec:
    """Offload: copy host-tier slots into a request's device blocks (same order)."""

    request_id: str
    block_ids: tuple[int, ...]
    slots: tuple[int, ...]


@dataclass(frozen=True)
class OffloadStepSpec:
    """Offload tier work of one step, run by each worker in this order. Keys: block hashes."""

    # (key, host slot, chunk info) evicted to disk: copied out before anything reuses the slot
    spills: tuple[tuple[bytes, int, str], ...] = ()
    # disk chunks to read (and validate) into host slots
    promotes: tuple[tuple[bytes, int], ...] = ()
    # (key, device block id, host slot): blocks computed this step to copy to host
    stores: tuple[tuple[bytes, int, int], ...] = ()
    # disk chunks evicted from the disk tier
    deletes: tuple[bytes, ...] = ()

    def is_empty(self) -> bool:
        return not (self.spills or self.promotes or self.stores or self.deletes)


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


# LLMDWorkerMetadata kind of the shared tier's stores
SHARED_STORE = "shared_store"


@dataclass
class LLMDWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker → scheduler each step: tier copies done, per kind and key.

    kind -> key -> [succeeded, failed] worker count, where kind and key are
    "store" | "spill" | "promote" (offload) -> block hash, or
    SHARED_STORE -> `SharedStoreSpec.key`.
    """

    results: dict[str, dict[bytes, list[int]]] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> LLMDWorkerMetadata:
        assert isinstance(other, LLMDWorkerMetadata), type(other)
        for kind, per_key in other.results.items():
            mine = self.results.setdefault(kind, {})
            for key, (succeeded, failed) in per_key.items():
                counts = mine.setdefault(key, [0, 0])
                counts[0] += succeeded
                counts[1] += failed
        return self


@dataclass
class LLMDHandshake(KVConnectorHandshakeMetadata):
    """Worker → scheduler at start-up: where this worker's side channel listens."""

    tp_rank: int
    side_channel_port: int | None
