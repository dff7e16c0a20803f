"""What the router records of one request: its decision, counted as it is taken; who served it,
counted when its answer is whole; and one audit line however it ends (answered or failed)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vllm_llmd.router.audit import AuditLog, Outcome, audit_record
from vllm_llmd.router.dispatch import Served
from vllm_llmd.router.metrics import RouterMetrics
from vllm_llmd.router.routing import Route

# the requests metric's status for a request whose client disconnected first (nginx's 499)
CLIENT_CLOSED_STATUS = 499


@dataclass
class RequestRecord:
    """One request as the router saw it, filled in as it goes."""

    path: str
    arrived: float  # time.time(), for the audit line
    started: float  # time.monotonic(), for its latencies
    body: Mapping[str, Any] = field(default_factory=dict)  # the client's (validated) body
    route: Route | None = None
    # arrival to the routing decision (tokenizing, cache lookup, the wait in the router's queue)
    routed_s: float | None = None
    served: Served = field(default_factory=Served)


class RequestRecorder:
    """Counts decisions and answers in the router's metrics and writes the audit log."""

    def __init__(
        self, metrics: RouterMetrics, audit: AuditLog | None, policy: str, audit_prompts: bool
    ) -> None:
        self.metrics = metrics
        self.audit = audit
        self.policy = policy
        self.audit_prompts = audit_prompts

    def decided(self, record: RequestRecord, route: Route) -> None:
        """Count a decision as it is taken."""
        record.route = route
        record.routed_s = time.monotonic() - record.started
        kind = "pd" if route.prefill else "direct"
        self.metrics.decisions.labels(self.policy, kind).inc()
        self.metrics.hit_tokens.observe(route.hit_tokens)
        if route.num_prompt_tokens is not None:
            self.metrics.prompt_tokens.labels(route.decode.pod).inc(route.num_prompt_tokens)
            self.metrics.prefix_hit_tokens.labels(route.decode.pod).inc(route.hit_tokens)

    def answered(self, record: RequestRecord) -> None:
        """A pod's answer was relayed whole (its end not yet sent): count who served it and
        write its audit line."""
        route, served = record.route, record.served
        assert route is not None and served.pod is not None and served.status is not None
        if served.status == 200:
            if route.prefill is not None and served.prefilled:
                self.metrics.routed.labels(route.prefill.pod, "prefill").inc()
                self.metrics.routed.labels(served.pod, "decode").inc()
            else:
                self.metrics.routed.labels(served.pod, "both").inc()
        ttft_s = None
        if record.body.get("stream") and served.status == 200 and served.first_byte is not None:
            ttft_s = served.first_byte - record.started
        if served.status == 200:
            self._count_slo(route, ttft_s, time.monotonic() - record.started)
        self._write(record, served.status, ttft_s)

    def _count_slo(self, route: Route, ttft_s: float | None, latency_s: float) -> None:
        """On time or late against its TTFT SLO, by priority (llmd:router_slo_requests)."""
        target = route.request_class.slo.ttft_s
        if target is None:
            return
        if ttft_s is not None:
            outcome = "on_time" if ttft_s <= target else "late"
        else:  # unstreamed: the whole answer within the SLO is on time, else unknown
            outcome = "on_time" if latency_s <= target else "unmeasured"
        self.metrics.slo_requests.labels(str(route.request_class.priority), outcome).inc()

    def failed(self, record: RequestRecord, status: int = CLIENT_CLOSED_STATUS) -> None:
        """A request failed before its answer was complete: a routed one's audit line says how."""
        if record.route is not None and not record.served.recorded:
            self._write(record, status, None)

    def _write(self, record: RequestRecord, status: int, ttft_s: float | None) -> None:
        assert record.route is not None
        record.served.recorded = True
        if self.audit is None:
            return
        outcome = Outcome(
            path=record.path,
            arrived=record.arrived,
            status=status,
            ttft_s=ttft_s,
            latency_s=time.monotonic() - record.started,
            routed_s=record.routed_s,
            served_pod=record.served.pod,
            prefilled=record.served.prefilled,
            prefill_s=record.served.prefill_s,
        )
        self.audit.write(audit_record(record.route, record.body, self.audit_prompts, outcome))
