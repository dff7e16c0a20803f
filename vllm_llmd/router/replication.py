"""Hot prefixes copied to another pod ahead of demand, off the request path.

When one pod holds a prefix that much of the traffic wants, a prefix-aware policy must choose,
request by request, between queueing behind that pod and recomputing the prefix elsewhere (or,
with --pull-from-holders, pulling it on the request's own path). The router sees the pressure
as it decides. A request presses its prefix when it:

- was routed past the prefix's best holder: its pod lacks `min_tokens` or more of what the
  holder has (it recomputes them, or pulls them before its first token); or
- went to a holder that cannot serve it within its TTFT SLO: predicted later than the SLO by
  the holder's latency model, or, without an SLO or a warm model, with `QUEUED_AHEAD` of the
  router's requests already waiting to start there.

When `after` requests press one prefix within `WINDOW_S`, `HotPrefixes` plans copies: the
least-loaded pods lacking the prefix (and with room in their KV caches) pull it from the pods
holding it, as many as hold it, one from each: while the pressure lasts, the number of
holders doubles every `WINDOW_S` (a prefix half of a 64-pod cluster wants must not wait for
copies one at a time).
`Replicator` runs it as a P/D pair of one-token requests through the pods' own API (the same
protocol, leases and checks as every P/D transfer; vLLM's scheduler allocates the blocks,
which no call beside it could): the holder runs the prefix as a first step (all but its last
token a cache hit), the target runs it with the KV pulled over the side channel. The target
then holds the prefix (its device cache, and its tiers as it evicts), its KV events tell the
index, and the policy spreads the prefix's traffic over both pods. No request waits for a
copy.

Bounded: one copy in flight per target pod, `per_minute` copies a minute, and a prefix is not
copied again for `WINDOW_S` (its next copies go out only if the pressure persists).

A copy must not cost its target what it serves. vLLM makes room for new blocks by evicting
the least recently used cached ones, so a copy evicts nothing in use only where it fits in the
pod's KV cache beside the pod's working set: the distinct prompt blocks the router sent it
within `WORKING_SET_S` (`WorkingSets`). A pod where it does not fit receives no copy; nor does
one whose KV cache is over `MAX_TARGET_KV_USAGE` in use by running requests. (Where a pod's
cache holds a few documents, as on the CPU benchmarks' pods, a copy would otherwise evict a
large share of what that pod serves, and its next requests would recompute it.)
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from vllm_llmd.log import ThrottledLog
from vllm_llmd.router.metrics import RouterMetrics
from vllm_llmd.router.off_loop import OffLoop
from vllm_llmd.router.recent import RecentRoutes
from vllm_llmd.router.routing import Route
from vllm_llmd.router.scoring import PodCache
from vllm_llmd.router.tokens import TokenProcessor
from vllm_llmd.router.upstream import post, upstream_error

logger = logging.getLogger(__name__)

# a request pressing a prefix counts for this long, and a copied prefix waits this long before
# another copy (the simulator's llm-d-shaped runs at 16 pods: 10 s left the holders too few)
WINDOW_S = 2.0
# router's requests not yet answering on a holder that make the next one there wait
QUEUED_AHEAD = 2
# a pod whose KV cache is fuller than this receives no copy: the copy's blocks would evict
# (or preempt) what it is serving, a cost its own requests pay at once
MAX_TARGET_KV_USAGE = 0.8
# prefixes tracked at once (the least recently pressed are forgotten past this)
MAX_TRACKED = 4096
# a block the router sent a pod within this long is in the pod's working set: a copy that would
# evict it is not made (a user's next turn comes within a chat's think time; a block unused
# for longer is what LRU eviction is for)
WORKING_SET_S = 30.0
_NO_CACHE = PodCache()


@dataclass(frozen=True)
class Replication:
    """One planned copy: `num_blocks` leading blocks of a prompt, from source to target."""

    source: str
    target: str
    num_blocks: int
    # the hash of the prefix's last block (what identifies the prefix)
    key: int


class WorkingSets:
    """Per pod, the distinct prompt blocks the router sent it within `window_s`, as far as the
    pod's KV cache could hold them (past that, the oldest are forgotten: the set is full)."""

    def __init__(self, window_s: float = WORKING_SET_S) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = window_s
        # pod -> block hash -> when it was last sent there, least recently first
        self._pods: dict[str, OrderedDict[int, float]] = {}
        self._swept = 0.0

    def touch(self, pod: str, hashes: Sequence[int], now: float, capacity: int) -> None:
        """A request with these prompt blocks was sent to `pod`, whose KV cache holds
        `capacity` blocks (0: not known, nothing is kept)."""
        if capacity <= 0:
            return
        used = self._pods.setdefault(pod, OrderedDict())
        for block_hash in hashes:
            used[block_hash] = now
            used.move_to_end(block_hash)
        self._expire(used, now)
        while len(used) > capacity:
            used.popitem(last=False)
        if now - self._swept >= self.window_s:
            self._sweep(now)

    def size(self, pod: str, now: float) -> int:
        """How many blocks are in the pod's working set now."""
        used = self._pods.get(pod)
        if not used:
            return 0
        self._expire(used, now)
        return len(used)

    def __len__(self) -> int:
        """Pods with a working set kept."""
        return len(self._pods)

    def _sweep(self, now: float) -> None:
        """Forget the pods sent nothing within the window (gone from the cluster, say): once a
        window, so a departed pod's set does not outlive it."""
        self._swept = now
        for pod, used in list(self._pods.items()):
            self._expire(used, now)
            if not used:
                del self._pods[pod]

    def _expire(self, used: OrderedDict[int, float], now: float) -> None:
        while used and next(iter(used.values())) <= now - self.window_s:
            used.popitem(last=False)


class HotPrefixes:
    """Counts the requests that press each prefix and plans a copy when one is hot. Pure: no
    I/O, a clock it is given (tested, and usable by the simulator, without a server)."""

    def __init__(
        self,
        after: int,
        per_minute: int,
        min_tokens: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if after < 1 or per_minute < 1 or min_tokens < 1:
            raise ValueError(
                f"need after, per_minute and min_tokens >= 1, got {after}, {per_minute}, "
                f"{min_tokens}"
            )
        self.after, self.per_minute, self.min_tokens = after, per_minute, min_tokens
        self._clock = clock
        # prefix key -> times it was pressed (within WINDOW_S), least recently pressed first
        self._pressed: OrderedDict[int, deque[float]] = OrderedDict()
        # prefix key -> when it may be copied again
        self._cooling: dict[int, float] = {}
        # start times of the copies of the last minute, and the pods receiving one now
        self._started: deque[float] = deque()
        self._receiving: set[str] = set()
        self.working = WorkingSets()

    def observe(self, route: Route, hashes: Sequence[int], block_size: int) -> list[Replication]:
        """The copies to start now, if this routed request makes its prefix hot: as many as
        pods hold it (so the holders double while the pressure lasts), each from one of them.
        `block_size`: the pods' tokens per block (the tokenizer may take it from a pod after
        start)."""
        now = self._clock()
        self._touch(route, hashes, now)
        min_blocks = max(1, self.min_tokens // block_size)
        caches = route.caches
        candidates = list(route.decode.scores) or [route.decode.pod]
        holder = max(candidates, key=lambda pod: caches.get(pod, _NO_CACHE).num_blocks)
        held = caches.get(holder, _NO_CACHE).num_blocks
        if held < min_blocks or held > len(hashes):
            return []
        chosen = route.decode.pod
        passed_over = held - caches.get(chosen, _NO_CACHE).num_blocks >= min_blocks
        if not passed_over and not _late(route):
            return []
        key = hashes[held - 1]
        times = self._pressed.pop(key, None) or deque()
        times.append(now)
        while times and times[0] <= now - WINDOW_S:
            times.popleft()
        self._pressed[key] = times  # most recently pressed last
        while len(self._pressed) > MAX_TRACKED:
            self._pressed.popitem(last=False)
        if len(times) < self.after or self._cooling.get(key, 0.0) > now:
            return []
        while self._started and self._started[0] <= now - 60.0:
            self._started.popleft()
        budget = self.per_minute - len(self._started)
        holders = [p for p in candidates if held - caches.get(p, _NO_CACHE).num_blocks < min_blocks]
        # not the pod this request takes the prefix to, nor one that holds most of it already
        lacking = [
            pod
            for pod in candidates
            if pod != chosen
            and pod not in holders
            and pod not in self._receiving
            and _kv_usage(route, pod) <= MAX_TARGET_KV_USAGE
            and self._fits(route, pod, held, now)
        ]
        lacking.sort(key=lambda pod: (_queue_then_batch(route, pod), pod))
        targets = lacking[: min(len(holders), budget)]
        if not targets:
            return []
        self._started.extend([now] * len(targets))
        self._receiving.update(targets)
        self._cooling[key] = now + WINDOW_S
        for stale in [k for k, until in self._cooling.items() if until <= now]:
            del self._cooling[stale]
        del self._pressed[key]
        # each holder sends at most one copy, the best holder first (targets may be fewer)
        sources = [holder, *(p for p in holders if p != holder)]
        pairs = zip(sources, targets, strict=False)
        return [Replication(source, target, held, key) for source, target in pairs]

    def done(self, copy: Replication) -> None:
        """The copy ended (either way): its target may receive another."""
        self._receiving.discard(copy.target)

    def _touch(self, route: Route, hashes: Sequence[int], now: float) -> None:
        """The pods this request's prompt blocks go to (a P/D route's prefill pod too)."""
        pods = [route.decode.pod] + ([route.prefill.pod] if route.prefill is not None else [])
        for pod in pods:
            load = route.loads.get(pod)
            self.working.touch(pod, hashes, now, 0 if load is None else load.kv_blocks)

    def _fits(self, route: Route, pod: str, num_blocks: int, now: float) -> bool:
        """A copy of `num_blocks` fits in the pod's KV cache beside its working set (or the
        cache's size is not known)."""
        load = route.loads.get(pod)
        capacity = 0 if load is None else load.kv_blocks
        return not capacity or self.working.size(pod, now) + num_blocks <= capacity


def _late(route: Route) -> bool:
    """The request's pod is predicted to miss its TTFT SLO (or, with no SLO or no prediction,
    has QUEUED_AHEAD of the router's requests waiting to start)."""
    slo = route.request_class.slo.ttft_s
    if slo is not None and route.prediction is not None and route.prediction.ttft_s is not None:
        return route.prediction.ttft_s > slo
    load = route.loads.get(route.decode.pod)
    return load is not None and load.num_prefilling >= QUEUED_AHEAD


def _kv_usage(route: Route, pod: str) -> float:
    load = route.loads.get(pod)
    return 0.0 if load is None else load.kv_usage


def _queue_then_batch(route: Route, pod: str) -> tuple[int, int]:
    load = route.loads.get(pod)
    return (0, 0) if load is None else (load.num_waiting + load.num_prefilling, load.num_active)


class Replicator:
    """Runs the copies `HotPrefixes` plans, each in a task of its own."""

    def __init__(
        self,
        hot: HotPrefixes,
        tokens: TokenProcessor,
        tokenize: OffLoop,
        metrics: RouterMetrics,
        recent: RecentRoutes | None,
    ) -> None:
        self.hot = hot
        self.tokens = tokens
        self.tokenize = tokenize
        self.metrics = metrics
        self.recent = recent
        self._tasks: set[asyncio.Task[None]] = set()
        self._log = ThrottledLog(logger)

    def observe(
        self,
        session: aiohttp.ClientSession,
        route: Route,
        hashes: Sequence[int],
        path: str,
        body: Mapping[str, Any],
    ) -> None:
        """Start the copies this request makes due, if any (call on the event loop)."""
        copies = self.hot.observe(route, hashes, self.tokens.block_size)
        if copies:
            task = asyncio.create_task(self._run(session, copies, list(hashes), path, body))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(
        self,
        session: aiohttp.ClientSession,
        copies: list[Replication],
        hashes: list[int],
        path: str,
        body: Mapping[str, Any],
    ) -> None:
        """The prompt tokenized once for all of this request's copies, then each copy."""
        try:
            tokenized = await self.tokenize.run(self.tokens.tokenize_request, path, body)
            model = body["model"]
        except asyncio.CancelledError:
            for copy in copies:
                self.hot.done(copy)
            raise
        except Exception as exc:
            for copy in copies:
                self._failed(copy, exc)
                self.hot.done(copy)
            return
        # one token past the prefix: every block of it is then full, and pulled
        prompts = [tokenized.token_ids[: c.num_blocks * self.tokens.block_size + 1] for c in copies]
        await asyncio.gather(
            *(
                self._copy(session, copy, prompt, model, hashes)
                for copy, prompt in zip(copies, prompts, strict=True)
            )
        )

    async def _copy(
        self,
        session: aiohttp.ClientSession,
        copy: Replication,
        prompt: list[int],
        model: str,
        hashes: list[int],
    ) -> None:
        started = time.monotonic()
        try:
            request_id = f"llmd-copy-{uuid.uuid4().hex}"
            first = {"do_remote_decode": True}
            answer = await _one_token(session, copy.source, model, prompt, first, request_id)
            params = answer.get("kv_transfer_params")
            if not isinstance(params, dict) or not params:
                raise RuntimeError(f"{copy.source} returned no kv_transfer_params")
            await _one_token(session, copy.target, model, prompt, params, request_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a failed copy costs nothing but the copy
            self._failed(copy, exc)
        else:
            self.metrics.prefix_copies.labels("done").inc()
            if self.recent is not None:  # the target holds it now, before its events say so
                self.recent.record(copy.target, hashes[: copy.num_blocks])
            logger.info(
                "copied a hot prefix (%d blocks) from %s to %s in %.2f s",
                copy.num_blocks,
                copy.source,
                copy.target,
                time.monotonic() - started,
            )
        finally:
            self.hot.done(copy)

    def _failed(self, copy: Replication, exc: Exception) -> None:
        self.metrics.prefix_copies.labels("failed").inc()
        self._log.warning(
            "copying a hot prefix (%d blocks) from %s to %s failed: %r",
            copy.num_blocks,
            copy.source,
            copy.target,
            exc,
        )


async def _one_token(
    session: aiohttp.ClientSession,
    pod: str,
    model: str,
    prompt: list[int],
    kv_transfer_params: dict[str, Any],
    request_id: str,
) -> dict[str, Any]:
    """A one-token completion of `prompt` (token ids) on `pod`; its answer, or an error."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": 1,
        "stream": False,
        "kv_transfer_params": kv_transfer_params,
    }
    headers = {"X-Request-Id": request_id}
    async with await post(session, pod + "/v1/completions", body, headers) as resp:
        answer = await resp.json(content_type=None)
        if resp.status != 200:
            raise upstream_error(resp.status, answer)
    if not isinstance(answer, dict):
        raise RuntimeError(f"{pod} answered {type(answer).__name__}, not a JSON object")
    return answer
