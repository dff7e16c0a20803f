"""Admission (policy slo): a request goes when a pod can take it, else it waits its turn.

A request is admitted at once when no request is queued and `admissible()` says a pod can take
it now; a sheddable one is refused (429) otherwise; the rest wait in the `AdmissionQueue`
(priority, then fairness id) and are admitted in queue order by `pump` (after every finished
request and every `QUEUE_TICK_S` while the queue holds any), judged on what is left of their
TTFT SLO. At its deadline a request is dispatched "late" when its class is served late
(critical, or no TTFT SLO), else refused (429, counted "expired").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiohttp import web

from vllm_llmd.router.errors import error
from vllm_llmd.router.metrics import RouterMetrics
from vllm_llmd.router.slo import (
    AdmissionOutcome,
    AdmissionQueue,
    Admitted,
    QueuedRequest,
    QueueFullError,
    RequestClass,
)

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
        self._ticker: asyncio.Task[None] | None = None

    async def admit(
        self, request_class: RequestClass, admissible: Callable[[float], bool]
    ) -> tuple[Admitted, float]:
        """Wait until the request may go; (admission, seconds queued). 429/503 when refused.

        `admissible(waited_s)` judges it after `waited_s` in the queue."""
        # Never ahead of queued requests: they go first, in queue order (by pump).
        if not len(self.queue) and admissible(0.0):
            return "met", 0.0
        if request_class.sheddable:
            self._count("shed", request_class)
            raise self._too_many("no pod can serve this request within its SLO now")
        arrival = time.monotonic()
        timeout = request_class.slo.ttft_s or self.queue_timeout_s
        entry = QueuedRequest(
            request_class,
            arrival,
            arrival + timeout,
            admissible,
            asyncio.get_running_loop().create_future(),
        )
        try:
            self.queue.push(entry)
        except QueueFullError as exc:
            self._count("rejected", request_class)
            raise error(web.HTTPServiceUnavailable, str(exc)) from None
        self._ensure_ticker()
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
        """Admit queued requests in queue order while the head is admissible; expire the rest."""
        if not len(self.queue):
            return
        for entry in self.queue.expired(time.monotonic()):
            self.queue.remove(entry)
            if not entry.admitted.done():
                entry.admitted.set_result(False)
        # One at a time: an admitted request is counted in flight only once its coroutine
        # runs, so the next is judged on the next tick, against the updated counts.
        head = self.queue.peek()
        if head is not None and head.admissible(time.monotonic() - head.arrival):
            self.queue.pop()
            if not head.admitted.done():
                head.admitted.set_result(True)

    def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()

    def _ensure_ticker(self) -> None:
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        """Re-judge the queue while it holds requests (loads change with every poll)."""
        while len(self.queue):
            self.pump()
            await asyncio.sleep(QUEUE_TICK_S)
