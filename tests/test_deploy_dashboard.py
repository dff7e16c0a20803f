"""deploy/grafana/llmd-dashboard.json: every metric its queries name exists, with the labels the
queries use, so the dashboard cannot drift from the code.

- The router's metrics come from a real `RouterMetrics` registry (every labelled family given
  one child, then collected): the names its /metrics exposes (`_total` counters, `_bucket`,
  `_sum`, `_count` histograms; no `_created`) and each one's labels.
- The connector's come from `vllm_llmd.connector.stats` (COUNTERS, HISTOGRAMS, GAUGES with the
  suffixes Prometheus adds, checked against what `LLMDPromMetrics` exports), with the labels
  vLLM gives every connector metric (`model_name`, `engine`).
- vLLM's own `vllm:` names the dashboard uses are a fixed list here (`VLLM_METRICS`), each
  checked to be defined in the installed vLLM's metrics logger.

Labels a query groups by (`by (...)`, `without (...)`) or matches on (`{label=...}`) must
belong to a metric of that query, or be `le` (histogram buckets) or a label Prometheus adds to
every scraped series (`instance`, `job`).
"""

from __future__ import annotations

import copy
import inspect
import json
import re
from collections.abc import Iterator
from functools import cache, partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from vllm_llmd.connector import stats
from vllm_llmd.router.metrics import RouterMetrics

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "llmd-dashboard.json"

# a metric name in PromQL: llmd:* (router, connector) or vllm:* (vLLM's own)
METRIC_NAME = re.compile(r"(?<![\w:])((?:llmd|vllm):[A-Za-z0-9_:]+)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"\{([^{}]*)\}")
MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
LABEL_VALUES = re.compile(r"label_values\(\s*([^,\s)]+)\s*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)")

# the labels vLLM's PrometheusStatLogger gives its metrics and the connector's
# (vllm/v1/metrics/loggers.py: labelnames = ["model_name", "engine"])
VLLM_LABELS = frozenset({"model_name", "engine"})
# vLLM's own metrics the dashboard uses: exposed name -> labels
VLLM_METRICS: dict[str, frozenset[str]] = {
    "vllm:num_requests_waiting": VLLM_LABELS,
    "vllm:prompt_tokens_by_source_total": VLLM_LABELS | {"source"},
}
# labels Prometheus attaches to every scraped series
TARGET_LABELS = frozenset({"instance", "job"})


def _suffixed(name: str, kind: str) -> list[str]:
    """The series names Prometheus exposes for a metric family."""
    if kind == "counter":
        return [name + "_total"]
    if kind == "histogram":
        return [name + suffix for suffix in ("_bucket", "_sum", "_count")]
    return [name]


@cache
def router_metrics() -> dict[str, frozenset[str]]:
    """Exposed series name -> its labels, from a real RouterMetrics registry."""
    metrics = RouterMetrics()
    for wrapper in vars(metrics).values():
        labelnames = getattr(wrapper, "_labelnames", None)
        if labelnames:  # one child, so that collecting shows its series
            wrapper.labels(*["x"] * len(labelnames))
    names: dict[str, frozenset[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            names[sample.name] = frozenset(sample.labels)
        for name in _suffixed(family.name, family.type):
            assert name in names, f"{family.name}: no {name} series"
    return names


@cache
def connector_metrics() -> dict[str, frozenset[str]]:
    """Exposed series name -> its labels, from connector/stats.py's tables."""
    series = [
        *(n for name, _ in stats.COUNTERS.values() for n in _suffixed(name, "counter")),
        *(n for name, _, _ in stats.HISTOGRAMS.values() for n in _suffixed(name, "histogram")),
        *(n for name, _ in stats.GAUGES.values() for n in _suffixed(name, "gauge")),
    ]
    names: dict[str, frozenset[str]] = {}
    for name in series:
        names[name] = VLLM_LABELS | ({"le"} if name.endswith("_bucket") else set())
    return names


def known_metrics() -> dict[str, frozenset[str]]:
    return {**router_metrics(), **connector_metrics(), **VLLM_METRICS}


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def panels(container: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested (collapsed) panels included."""
    for panel in container.get("panels", []):
        yield panel
        yield from panels(panel)


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield f"panel {panel.get('title')!r} target {target.get('refId')}", target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            yield f"variable {variable['name']!r}", text


def problems(dashboard: dict[str, Any]) -> list[str]:
    """What is wrong with the dashboard's queries: unknown metrics, labels they do not have."""
    known = known_metrics()
    found = []
    for where, expr in queries(dashboard):
        names = METRIC_NAME.findall(expr)
        if not names:
            found.append(f"{where}: no llmd: or vllm: metric in {expr!r}")
        unknown = [name for name in names if name not in known]
        found += [f"{where}: unknown metric {name}" for name in unknown]
        if unknown:
            continue  # its labels cannot be checked
        labels = set(TARGET_LABELS).union(*(known[name] for name in names))
        used = {
            label.strip()
            for grouping in GROUPING.findall(expr)
            for label in grouping.split(",")
            if label.strip()
        }
        used |= {label for sel in SELECTOR.findall(expr) for label in MATCHER.findall(sel)}
        used |= {label for _, label in LABEL_VALUES.findall(expr)}
        found += [f"{where}: no metric of {expr!r} has label {label}" for label in used - labels]
    return found


def test_every_query_names_a_metric_the_code_exports() -> None:
    assert problems(load_dashboard()) == []


def test_a_misspelled_metric_or_label_is_caught() -> None:
    dashboard = load_dashboard()
    target = next(t for p in panels(dashboard) for t in p.get("targets", []))
    original = target["expr"]
    name = METRIC_NAME.findall(original)[0]
    typo = copy.deepcopy(dashboard)
    typo_target = next(t for p in panels(typo) for t in p.get("targets", []))
    typo_target["expr"] = original.replace(name, name.replace("_", "__", 1), 1)
    where = next(queries(typo))[0]
    assert problems(typo) == [f"{where}: unknown metric {name.replace('_', '__', 1)}"]
    for bare in ("llmd:pd_pull_seconds", "llmd:router_requests"):  # no suffix: not a series
        typo_target["expr"] = f"sum(rate({bare}[5m]))"
        assert problems(typo) == [f"{where}: unknown metric {bare}"]
    typo_target["expr"] = "sum by (pods) (rate(llmd:router_routed_total[5m]))"
    assert problems(typo) == [f"{where}: no metric of {typo_target['expr']!r} has label pods"]


def test_the_fixed_lists_match_the_code() -> None:
    # the connector's suffixes are what LLMDPromMetrics exports under vLLM's labels
    registry = CollectorRegistry()
    types = {cls: partial(cls, registry=registry) for cls in (Counter, Gauge, Histogram)}
    config = SimpleNamespace(kv_transfer_config=None)
    stats.LLMDPromMetrics(config, types, sorted(VLLM_LABELS), {0: ["m", "0"]})
    exported = {s.name: frozenset(s.labels) for f in registry.collect() for s in f.samples}
    assert exported == connector_metrics()
    # vLLM defines the metrics the dashboard takes from it (counters without "_total")
    from vllm.v1.metrics import loggers

    source = inspect.getsource(loggers)
    for name in VLLM_METRICS:
        assert f'name="{name.removesuffix("_total")}"' in source, name


def test_the_dashboard_is_a_grafana_dashboard_on_a_prometheus_variable() -> None:
    dashboard = load_dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    refs = [(p["id"], t["refId"]) for p in panels(dashboard) for t in p.get("targets", [])]
    assert len(refs) == len(set(refs))


def test_the_dashboard_covers_what_an_operator_watches() -> None:
    used = {name for _, expr in queries(load_dashboard()) for name in METRIC_NAME.findall(expr)}
    wanted = {
        "llmd:router_prefix_hit_tokens_total",
        "llmd:router_prompt_tokens_total",
        "llmd:router_decisions_total",
        "llmd:router_routed_total",
        "llmd:router_observed_ttft_seconds_bucket",
        "llmd:router_ttft_prediction_relative_error_bucket",
        "llmd:router_admissions_total",
        "llmd:router_slo_requests_total",
        "llmd:router_queue_depth",
        "llmd:router_event_gaps_total",
        "llmd:pd_pulled_bytes_total",
        "llmd:pd_pulls_failed_total",
        "llmd:pd_pull_seconds_bucket",
        "llmd:offload_host_chunks",
        "llmd:offload_host_capacity_chunks",
        "llmd:offload_disk_chunks",
        "llmd:offload_disk_capacity_chunks",
        "llmd:offload_busy_chunks",
        "llmd:pd_held_blocks",
    }
    assert wanted <= used, sorted(wanted - used)
