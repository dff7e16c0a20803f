"""The router's own Prometheus metrics (its /metrics), on a private registry.

Named as vLLM names its own (`vllm:*`) and the connector its (`llmd:*`): one `llmd:` family,
the router's under `llmd:router_*`. Counters end in `_total`; no `_created` series are exported
(`disable_created_metrics`, as vLLM's API server does). The prefix hit ratio is
`llmd:router_prefix_hit_tokens_total / llmd:router_prompt_tokens_total`, as vLLM's is
`vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total`.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from vllm_llmd.router.index import IndexStats
from vllm_llmd.router.pods import PodRegistry
from vllm_llmd.router.shared_view import SharedViewStats


class RouterMetrics:
    """Requests, latency, decisions, routed requests per pod, prefix hits, retries, index size,
    pod load, events and hash verification."""

    def __init__(self) -> None:
        # process-wide in prometheus_client: the router's metrics are its process's metrics
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llmd:router_requests",
            "Requests by route and answer status.",
            ["route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "llmd:router_request_seconds",
            "Time from request to the end of the answer.",
            ["route"],
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.decisions = Counter(
            "llmd:router_decisions",
            "Routing decisions by policy and kind (direct, or pd: prefill then decode).",
            ["policy", "kind"],
            registry=r,
        )
        self.hit_tokens = Histogram(
            "llmd:router_request_prefix_hit_tokens",
            "Cached prompt tokens on the chosen pod, per decision.",
            registry=r,
            buckets=(0, 128, 512, 1024, 2048, 4096, 8192, 16384),
        )
        self.prompt_tokens = Counter(
            "llmd:router_prompt_tokens",
            "Prompt tokens of the requests the router tokenized, by the pod chosen to serve "
            "them (decode or direct): the denominator of the prefix hit ratio (as "
            "vllm:prefix_cache_queries).",
            ["pod"],
            registry=r,
        )
        self.prefix_hit_tokens = Counter(
            "llmd:router_prefix_hit_tokens",
            "Of those, the tokens the router found cached on that pod (as "
            "vllm:prefix_cache_hits): hit ratio = this / llmd:router_prompt_tokens_total.",
            ["pod"],
            registry=r,
        )
        self.routed = Counter(
            "llmd:router_routed",
            "Requests each pod served, by the role it served them in: both (the whole "
            "request), prefill or decode (a P/D pair).",
            ["pod", "role"],
            registry=r,
        )
        self.retries = Counter(
            "llmd:router_retries",
            "Requests retried on another pod after a connection failure.",
            registry=r,
        )
        self.prefix_copies = Counter(
            "llmd:router_prefix_copies",
            "Hot prefixes copied to another pod ahead of demand, by outcome (done, failed).",
            ["outcome"],
            registry=r,
        )
        self.routing_fallbacks = Counter(
            "llmd:router_routing_fallbacks",
            "Requests routed by load alone because a routing input failed: tokenize_timeout "
            "(tokenizing took over --tokenize-timeout-s), index_timeout (an index or shared-tier "
            "lookup took over --index-timeout-s), index_error (it failed: Redis down).",
            ["reason"],
            registry=r,
        )
        self.stripped_kv_params = Counter(
            "llmd:router_client_kv_transfer_params_stripped",
            "Client requests whose kv_transfer_params the router removed (only its own P/D "
            "step sets them; --trust-client-kv-transfer-params keeps them).",
            registry=r,
        )
        self.audit_failures = Counter(
            "llmd:router_audit_write_failures",
            "Audit records that could not be written (dropped; the request was served).",
            registry=r,
        )
        self.index_entries = Gauge(
            "llmd:router_index_entries", "(block, pod) entries in the block index.", registry=r
        )
        self.shared_tier_blocks = Gauge(
            "llmd:router_shared_tier_blocks",
            "Blocks the router believes are in the shared KV tier (in-memory view only).",
            registry=r,
        )
        self.shared_tier_pods = Gauge(
            "llmd:router_shared_tier_pods",
            "Pods connected to the shared KV tier (they published a SHARED event).",
            registry=r,
        )
        self.pod_healthy = Gauge(
            "llmd:router_pod_healthy", "1 if the pod is in rotation.", ["pod"], registry=r
        )
        self.pod_waiting = Gauge(
            "llmd:router_pod_waiting", "The pod's waiting requests.", ["pod"], registry=r
        )
        self.pod_running = Gauge(
            "llmd:router_pod_running", "The pod's running requests.", ["pod"], registry=r
        )
        self.pod_kv_usage = Gauge(
            "llmd:router_pod_kv_usage", "The pod's KV cache usage (0..1).", ["pod"], registry=r
        )
        self.event_gaps = Counter(
            "llmd:router_event_gaps",
            "Gaps in the pod's KV-event stream (lost batches: its index entries may be stale).",
            ["pod"],
            registry=r,
        )
        self.events_subscribed = Gauge(
            "llmd:router_events_subscribed",
            "1 while the router follows the pod's KV events and has heard from it; 0 when "
            "it is followed but silent (no batch yet, or its stream failing), or not followed "
            "(events off, hashes not verified, or out of rotation): then its prefix cache is "
            "invisible and it is routed by load alone.",
            ["pod"],
            registry=r,
        )
        self.event_lag = Gauge(
            "llmd:router_event_lag_seconds",
            "Seconds since the pod's last KV event was applied.",
            ["pod"],
            registry=r,
        )
        self.hash_verification_ok = Gauge(
            "llmd:router_hash_verification_ok",
            "1 if the pod's tokens and block hashes match the router's (0: they differ or are "
            "not checked yet: the pod is routed by load alone).",
            ["pod"],
            registry=r,
        )

        # ---- latency models and admission (policy slo) ----
        self.observed_ttft = Histogram(
            "llmd:router_observed_ttft_seconds",
            "Time to first token the router observed, per pod and serve mode (direct, "
            "prefill, decode): what the latency models learn from.",
            ["pod", "mode"],
            registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.ttft_error = Histogram(
            "llmd:router_ttft_prediction_relative_error",
            "|predicted - observed| / observed TTFT of requests routed with a warm latency "
            "model: trust the slo policy when this stays low.",
            ["pod", "mode"],
            registry=r,
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2, 5),
        )
        self.model_samples = Gauge(
            "llmd:router_latency_model_samples",
            "Observations in the pod's TTFT model (predictions are used from "
            "--latency-min-samples on).",
            ["pod", "mode"],
            registry=r,
        )
        self.ttft_mean_miss = Gauge(
            "llmd:router_ttft_mean_miss_seconds",
            "How far the pod's TTFTs lay above its model's predictions lately, on average: the "
            "model predicts the typical answer, and a way of serving with a long tail (a P/D "
            "pull now and then starved) shows here; P/D by cost adds it.",
            ["pod", "mode"],
            registry=r,
        )
        self.admissions = Counter(
            "llmd:router_admissions",
            "Requests the slo policy did not admit at once, by priority and outcome: queued "
            "(waited, then admitted), late (dispatched at its deadline), shed (429 at once), "
            "expired (429: its TTFT SLO passed in the queue), rejected (queue full).",
            ["priority", "outcome"],
            registry=r,
        )
        self.slo_requests = Counter(
            "llmd:router_slo_requests",
            "Answered requests with a TTFT SLO, by priority and outcome: on_time or late (a "
            "streamed answer's TTFT, or an unstreamed one whole within the SLO), unmeasured "
            "(unstreamed and longer than the SLO: its first token's time is unknown).",
            ["priority", "outcome"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "llmd:router_queue_depth", "Requests waiting in the router's queue.", registry=r
        )
        self.pace_depth = Gauge(
            "llmd:router_paced_depth",
            "Requests waiting for room at their pod (prefill pacing, --prefill-pace-tokens).",
            registry=r,
        )
        self.pace_wait = Histogram(
            "llmd:router_pace_wait_seconds",
            "Seconds a request waited for room at its pod (prefill pacing): only those that "
            "waited.",
            registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )

    def event_gap(self, pod_id: str) -> None:
        """One gap in the pod's event stream (`EventIngestor.on_gap`: any thread)."""
        self.event_gaps.labels(pod_id).inc()

    def refresh(
        self,
        pods: PodRegistry,
        index: IndexStats | None,
        shared: SharedViewStats | None = None,
    ) -> None:
        """Copy point-in-time values (pod load, index size, event stats) into the gauges.

        `index` and `shared` are the stores' stats, read off the event loop by the caller
        (None: not read, the gauges keep their last values)."""
        live = pods.ingestor.live_pods() if pods.ingestor is not None else set()
        for pod_id, pod in pods.pods.items():
            self.events_subscribed.labels(pod_id).set(1 if pod.subscribed and pod_id in live else 0)
            self.pod_healthy.labels(pod_id).set(1 if pod.healthy else 0)
            self.pod_waiting.labels(pod_id).set(pod.load.num_waiting)
            self.pod_running.labels(pod_id).set(pod.load.num_running)
            self.pod_kv_usage.labels(pod_id).set(pod.load.kv_usage)
            if pods.tokens is not None:
                self.hash_verification_ok.labels(pod_id).set(1 if pod.hashes_ok else 0)
        if index is not None:
            self.index_entries.set(index.num_entries)
        if shared is not None:
            if shared.num_blocks is not None:
                self.shared_tier_blocks.set(shared.num_blocks)
            self.shared_tier_pods.set(shared.num_members)
        if pods.ingestor is not None:
            for pod_id, stats in pods.ingestor.stats().items():
                lag = stats.get("lag_s")
                if lag is not None:
                    self.event_lag.labels(pod_id).set(lag)

    def render(self) -> bytes:
        return generate_latest(self.registry)
