"""The router's view of the shared KV tier: which blocks any pod could load from it.

A block in the shared tier (LMCache, medium `SHARED` in our connector's KV events) is not held
by the pod that announced it: every pod pointed at the tier can load it. So the view is a set
of block hashes, not a pod -> tier map like `index.Index`, and a request's shared run is a
saving on every pod connected to the tier (`extend_with_shared`): the scorer then decides on
load and on what pods hold locally. A pod counts as connected once it published a SHARED event
(its connector announces every lookup it makes there), so a pod without the tier is never
credited with it. One router sees one shared tier.

Staleness is bounded by time, because the tier forgets without telling anyone (LMCache evicts
from memory, Redis may evict or expire): an entry lives `ttl_s` after it was last announced.
Our connector announces a run whenever one of its lookups hits it (a popular prefix stays
fresh) and whenever it stores one; a lookup that misses announces the first missing block as
removed, which cuts every consumer's run there. So a wrong "hit" lasts at most one miss or
`ttl_s`, and costs only a routing choice, never correctness (the pod recomputes).

Backends: `InMemorySharedView` (one router process, LRU-bounded) and `RedisSharedView` (one key
per block with a Redis TTL, shared by replicas like `RedisIndex`, bounded like it: every call
times out and retries as `redis_client.connect` says, and a Redis failure raises
`redis_client.IndexUnavailable`).
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from vllm_llmd.events.model import MEDIUM_SHARED
from vllm_llmd.router.redis_client import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_RETRIES,
    DEFAULT_SOCKET_TIMEOUT_S,
    connect,
    unavailable_on_failure,
)
from vllm_llmd.router.scoring import PodCache

DEFAULT_TTL_S = 300.0
_MEMBERS_CACHE_S = 1.0


@dataclass(frozen=True, slots=True)
class SharedViewStats:
    # blocks believed in the tier now; None where counting needs a scan (Redis)
    num_blocks: int | None
    num_marked: int
    num_forgotten: int
    # pods connected to the tier
    num_members: int


class SharedTierView(ABC):
    """Block hashes the shared tier holds, each for `ttl_s` after its last announcement."""

    def __init__(self, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError(f"the shared tier's ttl_s must be > 0, got {ttl_s}")
        self.ttl_s = ttl_s

    @abstractmethod
    def mark(self, pod: str, hashes: Sequence[int]) -> None:
        """`pod` saw these blocks in the tier (BlockStored, medium SHARED)."""

    @abstractmethod
    def forget(self, pod: str, hashes: Sequence[int]) -> None:
        """`pod` found these missing (BlockRemoved, medium SHARED). Unknown hashes: no-op."""

    @abstractmethod
    def members(self) -> frozenset[str]:
        """Pods connected to the tier: those that published a SHARED event."""

    @abstractmethod
    def remove_member(self, pod: str) -> None:
        """The pod left (or restarted): it is a member again once it announces something."""

    @abstractmethod
    def run_length(self, hashes: Sequence[int]) -> int:
        """How many of a request's block hashes, from the first, the tier holds in a row."""

    @abstractmethod
    def stats(self) -> SharedViewStats: ...

    def close(self) -> None:  # noqa: B027 (optional hook: nothing to release in memory)
        """Release connections. Idempotent."""


class InMemorySharedView(SharedTierView):
    """A `SharedTierView` in this process: hash -> expiry, at most `max_entries`, LRU."""

    def __init__(
        self,
        ttl_s: float = DEFAULT_TTL_S,
        max_entries: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(ttl_s)
        if max_entries <= 0:
            raise ValueError(f"max_entries must be > 0, got {max_entries}")
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._expiry: OrderedDict[int, float] = OrderedDict()  # oldest announcement first
        self._members: frozenset[str] = frozenset()
        self._num_marked = 0
        self._num_forgotten = 0

    def _join(self, pod: str) -> None:
        if pod not in self._members:
            self._members = self._members | {pod}

    def members(self) -> frozenset[str]:
        return self._members

    def remove_member(self, pod: str) -> None:
        with self._lock:
            self._members = self._members - {pod}

    def mark(self, pod: str, hashes: Sequence[int]) -> None:
        expires = self._clock() + self.ttl_s
        with self._lock:
            self._join(pod)
            for block_hash in hashes:
                self._expiry[block_hash] = expires
                self._expiry.move_to_end(block_hash)
            self._num_marked += len(hashes)
            while len(self._expiry) > self.max_entries:
                self._expiry.popitem(last=False)

    def forget(self, pod: str, hashes: Sequence[int]) -> None:
        with self._lock:
            self._join(pod)
            for block_hash in hashes:
                if self._expiry.pop(block_hash, None) is not None:
                    self._num_forgotten += 1

    def run_length(self, hashes: Sequence[int]) -> int:
        now = self._clock()
        with self._lock:
            for position, block_hash in enumerate(hashes):
                expires = self._expiry.get(block_hash)
                if expires is None:
                    return position
                if expires <= now:
                    del self._expiry[block_hash]
                    return position
            return len(hashes)

    def stats(self) -> SharedViewStats:
        with self._lock:
            # entries expire lazily (on lookup); drop the stale ones at the old end first
            now = self._clock()
            while self._expiry and next(iter(self._expiry.values())) <= now:
                self._expiry.popitem(last=False)
            return SharedViewStats(
                len(self._expiry), self._num_marked, self._num_forgotten, len(self._members)
            )


class RedisSharedView(SharedTierView):
    """A `SharedTierView` in Redis: `{ns}:shr:{hash}` keys that Redis expires after `ttl_s`,
    and the set `{ns}:shr-pods` of members.

    `mark` is one pipeline of SET PX (and SADD), `forget` one DEL, `run_length` one EXISTS
    pipeline over the request's hashes (one round trip; the scan for the first miss is here).
    Members are cached for a second: `members` is asked on every request.
    """

    def __init__(
        self,
        url: str,
        namespace: str = "llmd",
        ttl_s: float = DEFAULT_TTL_S,
        socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        super().__init__(ttl_s)
        # the redis extra; only this backend needs it (connect imports it)
        self._client = connect(
            url,
            connect_timeout_s=connect_timeout_s,
            socket_timeout_s=socket_timeout_s,
            retries=retries,
        )
        self._prefix = f"{namespace}:shr:"
        self._members_key = f"{namespace}:shr-pods"
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._num_marked = 0
        self._num_forgotten = 0
        self._members: frozenset[str] = frozenset()
        self._members_read_at = float("-inf")

    def members(self) -> frozenset[str]:
        if time.monotonic() - self._members_read_at > _MEMBERS_CACHE_S:
            with unavailable_on_failure(self._client, "RedisSharedView.members"):
                names = self._client.smembers(self._members_key)
            self._members = frozenset(n.decode() if isinstance(n, bytes) else n for n in names)
            self._members_read_at = time.monotonic()
        return self._members

    def remove_member(self, pod: str) -> None:
        with unavailable_on_failure(self._client, "RedisSharedView.remove_member"):
            self._client.srem(self._members_key, pod)
        self._members_read_at = float("-inf")

    def mark(self, pod: str, hashes: Sequence[int]) -> None:
        pipe = self._client.pipeline(transaction=False)
        if pod not in self._members:
            pipe.sadd(self._members_key, pod)
            self._members_read_at = float("-inf")
        for block_hash in hashes:
            pipe.set(self._prefix + str(block_hash), 1, px=self._ttl_ms)
        with unavailable_on_failure(self._client, "RedisSharedView.mark"):
            pipe.execute()
        self._num_marked += len(hashes)

    def forget(self, pod: str, hashes: Sequence[int]) -> None:
        with unavailable_on_failure(self._client, "RedisSharedView.forget"):
            if pod not in self._members:
                self._client.sadd(self._members_key, pod)
                self._members_read_at = float("-inf")
            if hashes:
                keys = [self._prefix + str(h) for h in hashes]
                self._num_forgotten += int(self._client.delete(*keys))

    def run_length(self, hashes: Sequence[int]) -> int:
        if not hashes:
            return 0
        pipe = self._client.pipeline(transaction=False)
        for block_hash in hashes:
            pipe.exists(self._prefix + str(block_hash))
        with unavailable_on_failure(self._client, "RedisSharedView.run_length"):
            replies = pipe.execute()
        for position, present in enumerate(replies):
            if not present:
                return position
        return len(hashes)

    def stats(self) -> SharedViewStats:
        members = self.members()
        return SharedViewStats(None, self._num_marked, self._num_forgotten, len(members))

    def close(self) -> None:
        self._client.close()


def extend_with_shared(
    caches: Mapping[str, PodCache], members: Collection[str], shared_blocks: int
) -> dict[str, PodCache]:
    """Each pod's cached run, continued by the shared tier's run where that is longer.

    A pod's own blocks keep their tier (its device or host copy beats a load from the shared
    tier); past them, the shared blocks count as tier SHARED on every member pod alike.
    """
    out = dict(caches)
    if shared_blocks <= 0:
        return out
    for pod in members:
        out[pod] = extended(out.get(pod) or PodCache(), shared_blocks, MEDIUM_SHARED)
    return out


def extended(cache: PodCache, num_blocks: int, tier: str) -> PodCache:
    """`cache` continued to num_blocks blocks in `tier` (unchanged if it is that long)."""
    if num_blocks <= cache.num_blocks:
        return cache
    return PodCache(num_blocks, cache.tiers + (tier,) * (num_blocks - cache.num_blocks))
