"""Prefill pacing: a prompt that would queue behind another's uncached prefill at its pod waits
in the router until that pod has room in a step for it, and goes on when it does.

Why: vLLM's chunked prefill fills each engine step up to its token budget, so two long uncached
prompts sent to one pod together share their steps and both get their first token when the
second is done (about twice the first's TTFT), and every request that arrives meanwhile waits
out those long steps too. Held in the router, the second starts when the first has answered:
the first answers in half the time, the second one step's fixed cost later than it would have,
and the short requests sent to the pod in between get steps of one prompt, not two. No work is
added: a prompt held is computed once, where it would have been. Meanwhile its prefix may
become cached (another request computing it), and it is routed again when it goes, on the
loads of then.

Which requests wait (`paced`): those whose uncached prompt tokens, added to the uncached
prompt tokens already ahead at the pod that would compute them (the router's own count of
its requests there not answering yet), exceed `pace_tokens`. A pod with nothing ahead takes
any prompt, a request whose prompt is cached passes however busy the pod, and requests that may
go pass those waiting. Waiting requests are judged in arrival order, at each first token and
each end of a request and every `TICK_S` while any waits, and released one at a time: the
next only once the last has been routed and counted at its pod (the caller routes it with no
await after `wait` returns). After `max_wait_s` a request goes regardless (a pod that stopped
answering is taken out of rotation by its health checks well before).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from vllm_llmd.router.load import PodLoad
from vllm_llmd.router.routing import Route

# how often the waiting requests are judged again while any waits (besides each first token
# and each end of a request)
TICK_S = 0.02

# a waiting request goes after this many seconds whatever the pod's load
MAX_WAIT_S = 30.0


def prefill_work(route: Route) -> tuple[str, int]:
    """The pod that computes the route's uncached prompt tokens, and how many: a P/D route's
    prefill pod, else its decode pod."""
    if route.prefill is not None and route.prefill_shape is not None:
        return route.prefill.pod, route.prefill_shape.uncached_tokens
    if route.prefill is not None:  # a prefill pod named upstream: not ours to pace
        return route.prefill.pod, 0
    return route.decode.pod, route.shape.uncached_tokens


def paced(route: Route, loads: Mapping[str, PodLoad], pace_tokens: int) -> bool:
    """The route's prompt must wait: its uncached tokens and those already ahead at the pod
    computing them exceed `pace_tokens`, and some are ahead (0: never)."""
    if pace_tokens <= 0:
        return False
    pod, uncached = prefill_work(route)
    load = loads.get(pod)
    ahead = load.prefill_tokens if load is not None else 0
    return uncached > 0 and ahead > 0 and ahead + uncached > pace_tokens


@dataclass(eq=False)
class _Waiting:
    may_go: Callable[[], bool]
    since: float
    released: asyncio.Future[None]


class PrefillPacer:
    """The requests waiting for room at their pod, in arrival order (see the module)."""

    def __init__(self, max_wait_s: float = MAX_WAIT_S) -> None:
        self.max_wait_s = max_wait_s
        self._waiting: list[_Waiting] = []
        self._ticker: asyncio.Task[None] | None = None
        # a released request has not resumed yet: its route is not counted at its pod
        self._releasing = False
        # requests that waited, and their seconds waiting, since the start
        self.num_paced = 0
        self.waited_s = 0.0

    def __len__(self) -> int:
        return len(self._waiting)

    async def wait(self, may_go: Callable[[], bool]) -> float:
        """Return once `may_go()` (the request is not `paced` on the loads of then) or its
        wait is over; the seconds it waited (0 when it may go at once). Route the request
        before the next await: until then no other waiting request is released."""
        if may_go():
            return 0.0
        entry = _Waiting(may_go, time.monotonic(), asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        self._ensure_ticker()
        try:
            await entry.released
        finally:
            if entry in self._waiting:  # its client left while it waited
                self._waiting.remove(entry)
            elif entry.released.done():  # released: routed now, or its client left
                self._releasing = False
        waited = time.monotonic() - entry.since
        self.num_paced += 1
        self.waited_s += waited
        return waited

    def pump(self) -> None:
        """Release the first waiting request that may go now (or whose wait is over), unless
        the last one released has not been routed yet."""
        if self._releasing:
            return
        now = time.monotonic()
        for entry in self._waiting:
            if now - entry.since >= self.max_wait_s or entry.may_go():
                self._waiting.remove(entry)
                self._releasing = True
                entry.released.set_result(None)
                return

    def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()

    def _ensure_ticker(self) -> None:
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        while self._waiting:
            self.pump()
            await asyncio.sleep(TICK_S)
