"""Prefixes the router just sent to a pod, before that pod's KV events say it holds them.

A pod publishes a prompt's blocks when its prefill has run: seconds, on a busy pod, after the
router chose it. A second request on the same prefix arriving in between (two users on one
document, a client's parallel calls) would find no pod holding it and go by load, and both
pods would compute the prefix. So the router remembers, for `ttl_s`, which pod it sent each
prefix to, and counts it as that pod's (tier GPU) past what the index already shows. This is
what an event-free router (a radix tree of routed prompts) knows; ours adds it only for the
gap the events leave, so an eviction the events report is never hidden for long.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

DEFAULT_TTL_S = 5.0


class RecentRoutes:
    """Block hash -> {pod: expiry} for prefixes routed in the last `ttl_s`; LRU-bounded."""

    def __init__(
        self,
        ttl_s: float = DEFAULT_TTL_S,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s <= 0 or max_entries <= 0:
            raise ValueError(f"need ttl_s > 0 and max_entries > 0, got {ttl_s}, {max_entries}")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._routes: OrderedDict[int, dict[str, float]] = OrderedDict()

    def record(self, pod: str, hashes: Sequence[int]) -> None:
        """The request with these block hashes was sent to `pod`."""
        now = self._clock()
        with self._lock:
            for block_hash in hashes:
                self._routes.setdefault(block_hash, {})[pod] = now + self.ttl_s
                self._routes.move_to_end(block_hash)
            # oldest first: drop what expired (so memory follows the rate, not the history),
            # then whatever exceeds the bound
            while self._routes and max(next(iter(self._routes.values())).values()) <= now:
                self._routes.popitem(last=False)
            while len(self._routes) > self.max_entries:
                self._routes.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._routes)

    def runs(self, hashes: Sequence[int]) -> dict[str, int]:
        """`run_length` of every pod that has one, in one walk of the hashes: a pod the first
        block was not sent to costs nothing (at 256 pods, a walk per pod would)."""
        now = self._clock()
        runs: dict[str, int] = {}
        going: set[str] = set()
        with self._lock:
            for position, block_hash in enumerate(hashes):
                routed = self._routes.get(block_hash, {})
                still = {
                    pod
                    for pod, expiry in routed.items()
                    if expiry > now and (position == 0 or pod in going)
                }
                for pod in going - still:
                    runs[pod] = position
                going = still
                if not going:
                    break
        for pod in going:
            runs[pod] = len(hashes)
        return runs

    def run_length(self, pod: str, hashes: Sequence[int]) -> int:
        """How many of the hashes, from the first, were sent to `pod` within `ttl_s`."""
        now = self._clock()
        with self._lock:
            for position, block_hash in enumerate(hashes):
                pods = self._routes.get(block_hash)
                if pods is None or pods.get(pod, 0.0) <= now:
                    return position
            return len(hashes)
