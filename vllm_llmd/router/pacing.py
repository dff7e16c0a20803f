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

Which requests wait (`paced`): long prompts (over half of `pace_tokens` uncached: two cannot
share a step within it) whose uncached tokens, added to the uncached prompt tokens already
ahead at the pod that would compute them (the router's own count of its requests there not
answering yet), exceed `pace_tokens`. The decision counts such pods saturated for the prompt
(`paced_pods`), so it goes at once to a pod without long work ahead where there is one, and
waits only when there is none. A pod with nothing ahead takes any prompt; a short prompt (a
cached document's question, a chat turn) is never held however busy its pod: held, it would
recompute elsewhere or wait out a long prompt it would only have shared a step with (counting
short prompts too cost the cache hits of llm-d's shape in the simulator, 93% to 86% at 64
pods); and requests that may go pass those waiting.

Waiting requests are judged in arrival order, at each first token and each end of a request
and every `TICK_S` while any waits, and released one at a time: the next only once the last
has been routed and counted at its pod (the caller routes it with no await after `wait`
returns). After `max_wait_s` a request goes regardless (a pod that stopped answering is taken
out of rotation by its health checks well before).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from vllm_llmd.router.load import PodLoad
from vllm_llmd.router.routing import Route
from vllm_llmd.router.scoring import PodCache
from vllm_llmd.router.ticker import Ticker

logger = logging.getLogger(__name__)

# how often the waiting requests are judged again while any waits (besides each first token
# and each end of a request)
TICK_S = 0.02

# a waiting request goes after this many seconds whatever the pod's load
MAX_WAIT_S = 30.0

# waiting requests judged per pump, oldest first: a request waits only when every pod it may go
# to would make it wait, so one further back is rarely freer than those ahead, and an overloaded
# router's event loop does not spend its ticks deciding hundreds of them again
MAX_JUDGED = 8


def prefill_work(route: Route) -> tuple[str, int]:
    """The pod that computes the route's uncached prompt tokens, and how many: a P/D route's
    prefill pod, else its decode pod."""
    if route.prefill is not None and route.prefill_shape is not None:
        return route.prefill.pod, route.prefill_shape.uncached_tokens
    if route.prefill is not None:  # a prefill pod named upstream: not ours to pace
        return route.prefill.pod, 0
    return route.decode.pod, route.shape.uncached_tokens


def paced(route: Route, loads: Mapping[str, PodLoad], pace_tokens: int) -> bool:
    """The route's prompt must wait: it is long, and its uncached tokens and those already
    ahead at the pod computing them exceed `pace_tokens` (0: never)."""
    pod, uncached = prefill_work(route)
    load = loads.get(pod)
    return _waits(load.prefill_tokens if load is not None else 0, uncached, pace_tokens)


def paced_pods(
    loads: Mapping[str, PodLoad],
    caches: Mapping[str, PodCache],
    num_tokens: int | None,
    block_size: int,
    pace_tokens: int,
) -> frozenset[str]:
    """The pods where a prompt of `num_tokens` would wait now (each with its cached run in
    `caches`): the decision counts them saturated for it, as pods without KV room, so a pod
    with no long prefill ahead takes it at once, and it waits only when every pod would make
    it (or the policy still picks one)."""
    if pace_tokens <= 0 or not num_tokens:
        return frozenset()
    waits = set()
    for pod, load in loads.items():
        if load.prefill_tokens <= 0:
            continue
        cache = caches.get(pod)
        uncached = num_tokens - (cache.num_blocks * block_size if cache is not None else 0)
        if _waits(load.prefill_tokens, uncached, pace_tokens):
            waits.add(pod)
    return frozenset(waits)


def _waits(ahead_tokens: int, uncached_tokens: int, pace_tokens: int) -> bool:
    """A long prompt (over half the budget: two cannot share a step within it) that would
    take the uncached tokens at its pod past the budget, behind some already there."""
    return (
        pace_tokens > 0
        and 2 * uncached_tokens > pace_tokens
        and ahead_tokens > 0
        and ahead_tokens + uncached_tokens > pace_tokens
    )


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
        self._ticker = Ticker(self.pump, lambda: bool(self._waiting), TICK_S)
        # a released request has not resumed yet: its route is not counted at its pod
        self._releasing = False
        # requests that waited, since the start
        self.num_paced = 0

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
        self._ticker.ensure()
        try:
            await entry.released
        finally:
            if entry in self._waiting:  # its client left while it waited
                self._waiting.remove(entry)
            elif entry.released.done():  # released: routed now, or its client left
                self._releasing = False
        self.num_paced += 1
        return time.monotonic() - entry.since

    def pump(self) -> None:
        """Release the first of the oldest `MAX_JUDGED` waiting requests that may go now (or
        whose wait is over), unless the last one released has not been routed yet."""
        if self._releasing:
            return
        now = time.monotonic()
        for entry in self._waiting[:MAX_JUDGED]:
            if now - entry.since >= self.max_wait_s or _may_go(entry):
                self._waiting.remove(entry)
                self._releasing = True
                entry.released.set_result(None)
                return

    def stop(self) -> None:
        self._ticker.stop()


def _may_go(entry: _Waiting) -> bool:
    """The entry's judgement; one that fails lets it go (a pump runs in a request's first
    byte, which must not fail for it, and in the ticker, which must go on)."""
    try:
        return entry.may_go()
    except Exception:
        logger.exception("prefill pacing: judging a waiting request failed; it goes")
        return True
