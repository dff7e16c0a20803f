"""LLMDConnector's counters and histograms, carried by vLLM's connector-stats path to its
/metrics.

Each worker reports what happened since its last report (`LLMDConnectorStats`: counter
increments, which add up across workers and steps, and histogram observations, lists that
concatenate); vLLM aggregates them, ships `to_dict()` to the API server, and
`LLMDPromMetrics.observe` adds them to Prometheus counters and histograms there (as vLLM's
NixlConnector does with its `vllm:nixl_xfer_time_seconds`).
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


# Seconds: a same-host pull or a host-tier load takes milliseconds, a cross-host pull or a
# disk load of a long prompt seconds.
_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# histogram key -> (Prometheus name, help, buckets): observations, one per event
HISTOGRAMS: dict[str, tuple[str, str, tuple[float, ...]]] = {
    "pd_pull_seconds": (
        "llmd:pd_pull_seconds",
        "Decode side: duration of each successful P/D pull (one per worker and request), from "
        "its start to the last block in the device cache.",
        _SECONDS_BUCKETS,
    ),
    "offload_load_seconds": (
        "llmd:offload_load_seconds",
        "Offload: duration of each successful load of a request's hit from the host and disk "
        "tiers into the device cache (one per worker and request), from its submission.",
        _SECONDS_BUCKETS,
    ),
}


# gauge key -> (Prometheus name, help): the scheduler half reports them when they change; the
# latest value wins
GAUGES: dict[str, tuple[str, str]] = {
    "offload_host_chunks": (
        "llmd:offload_host_chunks",
        "Offload: chunks (a block of every layer) the host tier holds now.",
    ),
    "offload_host_capacity_chunks": (
        "llmd:offload_host_capacity_chunks",
        "Offload: chunks the host tier can hold (host_offload_bytes).",
    ),
    "offload_disk_chunks": (
        "llmd:offload_disk_chunks",
        "Offload: chunks the disk tier holds now.",
    ),
    "offload_disk_capacity_chunks": (
        "llmd:offload_disk_capacity_chunks",
        "Offload: chunks the disk tier can hold (disk_offload_bytes); 0 without a disk tier.",
    ),
    "offload_busy_chunks": (
        "llmd:offload_busy_chunks",
        "Offload: chunk slots the copies in flight hold (pinned host slots, disk staging "
        "slots); 0 when no load or store is running, so one left above 0 is a leak.",
    ),
    "pd_held_blocks": (
        "llmd:pd_held_blocks",
        "Prefill side: device blocks held for decodes that have not released them yet (until "
        "their release or lease expiry); 0 when no hand-off is pending.",
    ),
}


@dataclass
class LLMDConnectorStats(KVConnectorStats):
    """Counter increments and histogram observations since the last report; missing keys
    count as 0 (counters) or no observation (histograms)."""

    data: dict[str, Any] = field(default_factory=dict)

    def add(self, key: str, amount: int = 1) -> None:
        assert key in COUNTERS, key
        self.data[key] = self.data.get(key, 0) + amount

    def observe(self, key: str, value: float) -> None:
        assert key in HISTOGRAMS, key
        self.data.setdefault(key, []).append(value)

    def set(self, key: str, value: int) -> None:
        assert key in GAUGES, key
        self.data[key] = value

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> LLMDConnectorStats:
        for key, value in other.data.items():
            # tolerate keys from a newer or older peer
            if key in COUNTERS:
                self.data[key] = self.data.get(key, 0) + value
            elif key in HISTOGRAMS and isinstance(value, list):
                self.data.setdefault(key, []).extend(value)
            elif key in GAUGES:
                self.data[key] = value  # the later report
        return self

    def reduce(self) -> dict[str, int | float]:
        reduced: dict[str, int | float] = {key: self.data.get(key, 0) for key in COUNTERS}
        for key in HISTOGRAMS:  # the logged summary: how many, and their mean
            values = self.data.get(key) or []
            reduced[f"{key}_count"] = len(values)
            reduced[f"{key}_mean"] = sum(values) / len(values) if values else 0.0
        reduced.update({key: self.data[key] for key in GAUGES if key in self.data})
        return reduced

    def is_empty(self) -> bool:
        # a gauge of 0 is news (the tier emptied); a counter of 0 or no observation is not
        return not any(v for k, v in self.data.items() if k not in GAUGES) and not any(
            k in GAUGES for k in self.data
        )


class LLMDPromMetrics(KVConnectorPromMetrics):
    """Prometheus counters and histograms for `LLMDConnectorStats`, one child per engine."""

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
        self._histograms = {
            key: create_metric_per_engine(
                self._histogram_cls(
                    name=name, documentation=doc, buckets=list(buckets), labelnames=labelnames
                ),
                per_engine_labelvalues,
            )
            for key, (name, doc, buckets) in HISTOGRAMS.items()
        }
        self._gauges = {
            key: create_metric_per_engine(
                self._gauge_cls(
                    name=name,
                    documentation=doc,
                    labelnames=labelnames,
                    multiprocess_mode="mostrecent",
                ),
                per_engine_labelvalues,
            )
            for key, (name, doc) in GAUGES.items()
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for key, value in transfer_stats_data.items():
            if key in self._counters and value:
                self._counters[key][engine_idx].inc(value)
            elif key in self._histograms and isinstance(value, list):
                histogram = self._histograms[key][engine_idx]
                for observation in value:
                    histogram.observe(observation)
            elif key in self._gauges:
                self._gauges[key][engine_idx].set(value)
