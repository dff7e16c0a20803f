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
)

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


@dataclass
class LLMDConnectorMetadata(KVConnectorMetadata):
    """What the worker half must do in one engine step."""

    sends: list[SendSpec] = field(default_factory=list)
    recvs: list[RecvSpec] = field(default_factory=list)
    releases: list[ReleaseSpec] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.sends or self.recvs or self.releases)


@dataclass
class LLMDHandshake(KVConnectorHandshakeMetadata):
    """Worker → scheduler at start-up: where this worker's side channel listens."""

    tp_rank: int
    side_channel_port: int | None
