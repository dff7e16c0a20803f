"""LLMDConnector's counters, carried by vLLM's connector-stats path to its /metrics.

Each worker reports what happened since its last report (`LLMDConnectorStats`, plain counters
that add up across workers and steps); vLLM aggregates them, ships `to_dict()` to the API
server, and `LLMDPromMetrics.observe` adds them to Prometheus counters there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)
from vllm.v1.metrics.utils import create_metric_per_engine

# counter key -> (Prometheus name, help). Names get "_total" appended by the client library.
COUNTERS: dict[str, tuple[str, str]] = {
    "pulls_done": ("llmd:pd_pulls_done", "Decode side: P/D pulls that completed."),
    "pulls_failed": (
        "llmd:pd_pulls_failed",
        "Decode side: P/D pulls that failed (the request was recomputed or failed per "
        "kv_load_failure_policy).",
    ),
    "pulled_bytes": ("llmd:pd_pulled_bytes", "Decode side: KV bytes received by P/D pulls."),
    "pulled_tokens": ("llmd:pd_pulled_tokens", "Decode side: prompt tokens loaded by P/D pulls."),
    "sends_released": (
        "llmd:pd_sends_released",
        "Prefill side: held transfers the decode side released after a successful pull.",
    ),
    "sends_failed": (
        "llmd:pd_sends_failed",
        "Prefill side: held transfers the decode side released without loading them.",
    ),
    "sends_expired": (
        "llmd:pd_sends_expired",
        "Prefill side: held transfers freed because their lease expired unread.",
    ),
    "offload_stored_chunks": (
        "llmd:offload_stored_chunks",
        "Offload: blocks copied from the device cache into the host tier.",
    ),
    "offload_loaded_chunks": (
        "llmd:offload_loaded_chunks",
        "Offload: blocks loaded from the host tier into the device cache instead of computed.",
    ),
    "offload_spilled_chunks": (
        "llmd:offload_spilled_chunks",
        "Offload: blocks written to the disk tier when the host tier evicted them.",
    ),
    "offload_promoted_chunks": (
        "llmd:offload_promoted_chunks",
        "Offload: blocks loaded from the disk tier into the device cache instead of computed.",
    ),
    "offload_dropped_chunks": (
        "llmd:offload_dropped_chunks",
        "Offload: computed blocks that reached no tier (every host and staging slot in use "
        "until their request ended).",
    ),
    "offload_rejected_chunks": (
        "llmd:offload_rejected_chunks",
        "Offload: disk files that failed validation (deleted; a miss, or a failed load if "
        "the file turned bad after it was checked).",
    ),
    "offload_failed_writes": (
        "llmd:offload_failed_writes",
        "Offload: store or spill copies that failed (the block is simply not offloaded).",
    ),
    "shared_loaded_tokens": (
        "llmd:shared_loaded_tokens",
        "Shared tier: prompt tokens loaded from the LMCache server instead of computed.",
    ),
    "shared_loaded_chunks": (
        "llmd:shared_loaded_chunks",
        "Shared tier: chunks read from the LMCache server (a partly cached first chunk counts).",
    ),
    "shared_load_failures": (
        "llmd:shared_load_failures",
        "Shared tier: loads that failed (the request was recomputed or failed per "
        "kv_load_failure_policy).",
    ),
    "shared_stored_chunks": (
        "llmd:shared_stored_chunks",
        "Shared tier: prompt chunks written to the LMCache server.",
    ),
    "shared_store_skipped_chunks": (
        "llmd:shared_store_skipped_chunks",
        "Shared tier: chunks offered for storing that the LMCache server already held.",
    ),
    "shared_store_failures": (
        "llmd:shared_store_failures",
        "Shared tier: chunks whose store failed (server down or erring; they are not shared).",
    ),
    "shared_stores_dropped": (
        "llmd:shared_stores_dropped",
        "Shared tier: chunks not stored because the server was down or too many chunks "
        "were waiting (shared_tier_max_inflight_chunks).",
    ),
}


@dataclass
class LLMDConnectorStats(KVConnectorStats):
    """Counter increments since the last report; missing keys count as 0."""

    data: dict[str, Any] = field(default_factory=dict)

    def add(self, key: str, amount: int = 1) -> None:
        assert key in COUNTERS, key
        self.data[key] = self.data.get(key, 0) + amount

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> LLMDConnectorStats:
        for key, value in other.data.items():
            if key in COUNTERS:  # tolerate keys from a newer or older peer
                self.data[key] = self.data.get(key, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        return {key: self.data.get(key, 0) for key in COUNTERS}

    def is_empty(self) -> bool:
        return not any(self.data.values())


class LLMDPromMetrics(KVConnectorPromMetrics):
    """Prometheus counters for `LLMDConnectorStats`, one child per engine."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {
            key: create_metric_per_engine(
                self._counter_cls(name=name, documentation=doc, labelnames=labelnames),
                per_engine_labelvalues,
            )
            for key, (name, doc) in COUNTERS.items()
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for key, value in transfer_stats_data.items():
            if key in self._counters and value:
                self._counters[key][engine_idx].inc(value)
