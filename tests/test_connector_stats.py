"""The connector's stats in vLLM's style: counters add up and histogram observations
concatenate across workers and steps; vLLM's prom logger turns them into `llmd:*_total`
counters and `llmd:pd_pull_seconds` / `llmd:offload_load_seconds` histograms, per engine."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from vllm_llmd.connector.stats import HISTOGRAMS, LLMDConnectorStats, LLMDPromMetrics


def test_stats_aggregate_counters_and_observations() -> None:
    one, two = LLMDConnectorStats(), LLMDConnectorStats()
    assert one.is_empty()
    one.add("pulls_done")
    one.observe("pd_pull_seconds", 0.5)
    two.add("pulls_done", 2)
    two.observe("pd_pull_seconds", 1.5)
    two.observe("offload_load_seconds", 0.01)
    # what vLLM ships between processes: the plain dict, rebuilt on the other side
    merged = LLMDConnectorStats(data=dict(one.to_dict())).aggregate(
        LLMDConnectorStats(data=two.to_dict())
    )
    assert merged.data["pulls_done"] == 3
    assert merged.data["pd_pull_seconds"] == [0.5, 1.5]
    reduced = merged.reduce()
    assert reduced["pd_pull_seconds_count"] == 2 and reduced["pd_pull_seconds_mean"] == 1.0
    assert reduced["offload_load_seconds_count"] == 1
    # a peer's unknown key is ignored, not a failure
    assert "future_key" not in merged.aggregate(LLMDConnectorStats(data={"future_key": 1})).data


def test_prom_metrics_export_histograms_per_engine() -> None:
    registry = CollectorRegistry()
    types = {cls: partial(cls, registry=registry) for cls in (Counter, Gauge, Histogram)}
    config = SimpleNamespace(kv_transfer_config=None)
    prom = LLMDPromMetrics(config, types, ["model_name", "engine"], {0: ["m", "0"]})
    stats = LLMDConnectorStats()
    stats.add("pulls_done")
    stats.observe("pd_pull_seconds", 0.2)
    stats.observe("pd_pull_seconds", 3.0)
    stats.observe("offload_load_seconds", 0.004)
    prom.observe(stats.to_dict(), engine_idx=0)
    text = generate_latest(registry).decode()
    assert 'llmd:pd_pulls_done_total{engine="0",model_name="m"} 1.0' in text
    assert 'llmd:pd_pull_seconds_count{engine="0",model_name="m"} 2.0' in text
    assert 'llmd:pd_pull_seconds_sum{engine="0",model_name="m"} 3.2' in text
    assert 'llmd:offload_load_seconds_bucket{engine="0",le="0.005",model_name="m"} 1.0' in text
    assert {name for name, _, _ in HISTOGRAMS.values()} == {
        "llmd:pd_pull_seconds",
        "llmd:offload_load_seconds",
    }


def test_occupancy_gauges_take_the_latest_value_and_are_exported() -> None:
    earlier, later = LLMDConnectorStats(), LLMDConnectorStats()
    earlier.set("offload_host_chunks", 7)
    later.set("offload_host_chunks", 0)  # the tier emptied: news, not an empty report
    assert not later.is_empty()
    merged = LLMDConnectorStats(data=dict(earlier.to_dict())).aggregate(later)
    assert merged.reduce()["offload_host_chunks"] == 0
    registry = CollectorRegistry()
    types = {cls: partial(cls, registry=registry) for cls in (Counter, Gauge, Histogram)}
    prom = LLMDPromMetrics(
        SimpleNamespace(kv_transfer_config=None), types, ["model_name", "engine"], {0: ["m", "0"]}
    )
    earlier.set("offload_host_capacity_chunks", 64)
    prom.observe(earlier.to_dict(), engine_idx=0)
    text = generate_latest(registry).decode()
    assert 'llmd:offload_host_chunks{engine="0",model_name="m"} 7.0' in text
    assert 'llmd:offload_host_capacity_chunks{engine="0",model_name="m"} 64.0' in text
