"""Admission (policy slo): a request goes when a pod can take it, else it waits its turn.

The router judges a request (`judge(waited_s)`: "admit", "wait" or "refuse"). It is admitted
at once when no request is queued and the verdict is "admit"; refused at once (429) when the
verdict is "refuse" (its SLO is out of reach and serving it would only hold up others), or
when it is sheddable and cannot be admitted now; the rest wait in the `AdmissionQueue`
(priority, then fairness id) and are judged again in queue order by `pump` (after every
finished request and every `QUEUE_TICK_S` while the queue holds any) on what is left of their
TTFT SLO: admitted, or taken out when refused. At its deadline, or when refused in the queue,
a request is dispatched "late" when its class is served late (critical, or no TTFT SLO), else
refused (429, counted "expired").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiohttp import web

from vllm_llmd.router.errors import error
from vllm_llmd.router.latency import RequestShape
from vllm_llmd.router.metrics import RouterMetrics
from vllm_llmd.router.predictive import SLOPlanner
from vllm_llmd.router.scoring import ScoreInput
from vllm_llmd.router.slo import (
    AdmissionOutcome,
    AdmissionQueue,
    Admitted,
    QueuedRequest,
    QueueFullError,
    RequestClass,
    Verdict,
)
from vllm_llmd.router.ticker import Ticker

# how often the admission queue is re-judged while it holds requests
QUEUE_TICK_S = 0.05


class Admission:
    """The router's admission queue and the task that re-judges it."""

    def __init__(
        self,
        max_queue: int,
        queue_timeout_s: float,
        retry_after_s: int,
        metrics: RouterMetrics,
    ) -> None:
        self.queue = AdmissionQueue(max_queue)
        self.queue_timeout_s = queue_timeout_s
        # whole seconds a shed client should wait (about one load poll)
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        # re-judges the queue while it holds requests (loads change with every poll)
        self._ticker = Ticker(self.pump, lambda: len(self.queue) > 0, QUEUE_TICK_S)

    async def admit(
        self, request_class: RequestClass, judge: Callable[[float], Verdict]
    ) -> tuple[Admitted, float]:
        """Wait until the request may go; (admission, seconds queued). 429/503 when refused.

        `judge(waited_s)` judges it after `waited_s` in the queue."""
        verdict = judge(0.0)
        # Never ahead of queued requests: they go first, in queue order (by pump).
        if verdict == "admit" and not len(self.queue):
            return "met", 0.0
        if verdict == "refuse":
            self._count("shed", request_class)
            raise self._too_many(
                "no pod can serve this request within its SLO, and the pods are busy"
            )
        if request_class.sheddable:
            self._count("shed", request_class)
            raise self._too_many("no pod can serve this request within its SLO now")
        arrival = time.monotonic()
        timeout = request_class.slo.ttft_s or self.queue_timeout_s
        entry = QueuedRequest(
            request_class,
            arrival,
            arrival + timeout,
            judge,
            asyncio.get_running_loop().create_future(),
        )
        try:
            self.queue.push(entry)
        except QueueFullError as exc:
            self._count("rejected", request_class)
            raise error(web.HTTPServiceUnavailable, str(exc)) from None
        self._ticker.ensure()
        self.pump()
        try:
            admitted = await entry.admitted
        finally:
            self.queue.remove(entry)  # no-op unless the client left while queued
        if not admitted and not request_class.served_late:
            self._count("expired", request_class)
            raise self._too_many("no pod could serve this request within its TTFT SLO")
        admission: Admitted = "queued" if admitted else "late"
        self._count(admission, request_class)
        return admission, time.monotonic() - arrival

    def _count(self, outcome: AdmissionOutcome, request_class: RequestClass) -> None:
        self.metrics.admissions.labels(str(request_class.priority), outcome).inc()

    def _too_many(self, why: str) -> web.HTTPException:
        return error(
            web.HTTPTooManyRequests,
            f"{why}; retry later",
            headers={"Retry-After": str(self.retry_after_s)},
        )

    def pump(self) -> None:
        """Judge the head of the queue: admit it, or take it out when refused (as when its
        deadline passes); expire the requests whose deadline has passed."""
        if not len(self.queue):
            return
        for entry in self.queue.expired(time.monotonic()):
            self.queue.remove(entry)
            _settle(entry, admitted=False)
        # One admission at a time: an admitted request is counted in flight only once its
        # coroutine runs, so the next is judged on the next tick, against the updated counts.
        # Refused heads are taken out at once: they must not hold up the requests behind.
        while (head := self.queue.peek()) is not None:
            verdict = head.judge(time.monotonic() - head.arrival)
            if verdict == "wait":
                return
            self.queue.pop()
            _settle(head, admitted=verdict == "admit")
            if verdict == "admit":
                return

    def stop(self) -> None:
        self._ticker.stop()


def _settle(entry: QueuedRequest, admitted: bool) -> None:
    """Tell a queued request's waiter whether it goes (once: its client may have left)."""
    if not entry.admitted.done():
        entry.admitted.set_result(admitted)


def judge(
    planner: SLOPlanner,
    request: ScoreInput,
    num_tokens: int | None,
    request_class: RequestClass,
    waited_s: float,
) -> Verdict:
    """Admit the request now, let it wait, or refuse it, after `waited_s` in the queue
    (`request`: the pods it may go to, their caches and loads now).

    Admitted when a pod is predicted to meet what is left of its SLO; waits while only
    load stands in the way (not all pods saturated and an idle pod would meet it). A miss
    of its own (no pod, however idle, meets what is left) goes when its class is served
    late; else best effort, which also warms the cache for the requests that share its
    prefix, only on arrival, only on an idle pod (no prompt ahead of it, none decoding)
    and never on the last pod with no prompt ahead: a long cold prompt served on a busy
    pod holds up for seconds the requests that could meet their SLOs (past saturation,
    admitted while at most a quarter of their own TTFT was queued ahead, such prompts
    still took over half the pods' time), its prefill step stalls every answer decoding
    there past a TPOT SLO (a 2.5 s step in a 16-token answer adds 170 ms to each of its
    tokens), and with every pod on such prompts the next warm request has nowhere to go
    (cache-warming needs few of them: each pod keeps what its last one computed). Otherwise
    it is refused (429) at once. (A plain request, with no SLO, objective or fairness id, is
    admitted by the caller without a judgement, as any policy would send it: only a queue of
    requests ahead holds it back.)"""
    if planner.all_saturated(request):
        return "wait"
    choice = planner.choose(request, num_tokens, request_class.within(waited_s).slo)
    if choice.meets:
        return "admit"
    if choice.load_bound:
        return "wait"
    if request_class.served_late:
        return "admit"
    if waited_s == 0 and _idle(choice.shape) and _another_free(request, choice.decision.pod):
        return "admit"
    return "refuse"


def _idle(shape: RequestShape) -> bool:
    """No prompt ahead of the request at its pod, and none answering there."""
    return shape.ahead_tokens == 0 and shape.active == 0


def _another_free(request: ScoreInput, pod: str) -> bool:
    """Another candidate has no prompt ahead either (with one pod there is none to keep)."""
    others = [p for p in request.candidates if p != pod]
    return not others or any(request.load(p).prefill_tokens == 0 for p in others)
