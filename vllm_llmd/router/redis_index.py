"""`RedisIndex`: the block index in Redis, so several router replicas share one view.

Schema, every key under `{ns}:` (one namespace per cluster of engines):

    {ns}:blk:{hash}   hash   field "{pod}|{tier}" -> reference count   (HINCRBY; field gone at 0)
    {ns}:pod:{pod}    set    the hashes the pod holds in any tier     (for clear_pod)
    {ns}:pods         set    pod ids that added something since their last clear_pod
    {ns}:stats        hash   shared counters: unknown_removals
    {ns}:epoch        string a random name of this content, set by the first writer: gone
                             when Redis lost its data (restarted without persistence, flushed)

Round trips: `add` is one MULTI/EXEC pipeline; `remove` one Lua script (decrement, delete at
<= 0 and drop the pod-set member must be atomic, or a concurrent add could be lost);
`lookup_prefix` one pipeline of HGETALL per hash; `clear_pod` one MULTI/EXEC (snapshot and
delete the pod set) plus HDEL pipelines in chunks.

Bounding: a TTL per block key (`ttl_s`, default one hour), refreshed on every add and on every
lookup (PEXPIRE rides in the lookup's pipeline, so it costs no extra round trip). We chose a TTL
over a max-entries LRU because an LRU shared by replicas needs a global recency structure
updated on every lookup (a ZSET write per block, trimmed by a script), while a TTL is kept by
Redis itself; and it also bounds what lost BlockRemoved events leave behind. A block that is
neither stored again nor asked for in `ttl_s` is forgotten: a future miss, never a wrong hit
for long. Expirations happen inside Redis and are not counted in `num_evictions`. Pod sets
have no TTL (a hot block could outlive its pod's set and survive clear_pod); they shrink on
remove and clear_pod, and a member whose block key expired lingers until then (HDEL on a
missing key is a no-op). For a hard byte bound also run Redis with `maxmemory` and
`volatile-lru`.

One writer per pod: the reference counts are only right if each pod's events are applied by
one ingestor (shard pods across replicas, or let one replica ingest and start the others with
`--no-ingest`; do not have every replica ingest every pod: following a pod starts with
`clear_pod`, so one replica's restart, or a health blip only it saw, would wipe that pod's
entries for every replica until its replay caught up).
Keys are built inside the Lua script only from KEYS, but the schema spans several keys per call:
a standalone Redis (or one cluster slot), not a sharded cluster.

Failures: every call is bounded by the timeouts and retries of `redis_client.connect`, and any
Redis failure raises `redis_client.IndexUnavailable` (the constructor too, when Redis cannot be
reached), never a redis-py exception.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Collection, Iterable, Sequence

try:
    import redis
except ImportError:  # pragma: no cover - the redis extra is missing
    raise ModuleNotFoundError(
        "RedisIndex needs the redis client: pip install 'vllm-llmd[redis]'"
    ) from None

from vllm_llmd.router.index import (
    TIERS,
    Index,
    IndexStats,
    PrefixHit,
    best_tier,
    check_tier,
    longest_prefixes,
)
from vllm_llmd.router.redis_client import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_RETRIES,
    DEFAULT_SOCKET_TIMEOUT_S,
    IndexUnavailable,
    connect,
    unavailable_on_failure,
    where,
)

_NAMESPACE = re.compile(r"[A-Za-z0-9_.:-]+")
# HDELs per pipeline in clear_pod: bounds one round trip's size for pods with many blocks
_CLEAR_CHUNK = 1000

# KEYS: pod set, stats hash, then one block key per hash.
# ARGV: field "pod|tier", the number of tiers T, the pod's field in each of the T tiers,
#       then the hashes (pod-set members), in KEYS order.
_REMOVE_SCRIPT = """
local field = ARGV[1]
local num_tiers = tonumber(ARGV[2])
local unknown = 0
for i = 3, #KEYS do
  local key = KEYS[i]
  local count = tonumber(redis.call('HGET', key, field) or '0')
  if count > 1 then
    redis.call('HINCRBY', key, field, -1)
  elseif count == 1 then
    redis.call('HDEL', key, field)
    local held = 0
    for t = 1, num_tiers do
      held = held + redis.call('HEXISTS', key, ARGV[2 + t])
    end
    if held == 0 then
      redis.call('SREM', KEYS[1], ARGV[num_tiers + i])
    end
  else
    unknown = unknown + 1
  end
end
if unknown > 0 then
  redis.call('HINCRBY', KEYS[2], 'unknown_removals', unknown)
end
return unknown
"""


class RedisIndex(Index):
    """An `Index` in Redis at `url`, under `namespace`; see the module docstring."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        namespace: str = "llmd",
        ttl_s: float | None = 3600.0,
        socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        if not _NAMESPACE.fullmatch(namespace):
            raise ValueError(f"namespace {namespace!r} must be non-empty letters, digits or '_.:-'")
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0 (or None for no expiry), got {ttl_s}")
        self.namespace = namespace
        self.ttl_ms = None if ttl_s is None else max(1, int(ttl_s * 1000))
        self._client = connect(
            url,
            connect_timeout_s=connect_timeout_s,
            socket_timeout_s=socket_timeout_s,
            retries=retries,
        )
        try:
            self._client.ping()
        except redis.RedisError as exc:
            self._client.close()
            raise IndexUnavailable(
                f"RedisIndex: cannot reach Redis at {where(self._client)} ({exc}); start "
                "redis-server there or give the index the right URL"
            ) from exc
        self._remove = self._client.register_script(_REMOVE_SCRIPT)
        self._pods_key = f"{namespace}:pods"
        self._stats_key = f"{namespace}:stats"
        self._epoch_key = f"{namespace}:epoch"

    def epoch(self) -> str:
        """The content's name (`{ns}:epoch`), set now when missing (see `Index.epoch`)."""
        pipe = self._client.pipeline(transaction=True)
        pipe.set(self._epoch_key, secrets.token_hex(8), nx=True)
        pipe.get(self._epoch_key)
        with unavailable_on_failure(self._client, "RedisIndex.epoch"):
            _, value = pipe.execute()
        return str(value)

    def _block_key(self, block_hash: int) -> str:
        return f"{self.namespace}:blk:{block_hash}"

    def _pod_key(self, pod: str) -> str:
        return f"{self.namespace}:pod:{pod}"

    def add(self, pod: str, tier: str, hashes: Sequence[int]) -> None:
        field = f"{pod}|{check_tier(tier)}"
        if not hashes:
            return
        # MULTI/EXEC: a concurrent clear_pod sees all of this batch or none of it
        pipe = self._client.pipeline(transaction=True)
        for block_hash in hashes:
            key = self._block_key(block_hash)
            pipe.hincrby(key, field, 1)
            if self.ttl_ms is not None:
                pipe.pexpire(key, self.ttl_ms)
        pipe.sadd(self._pod_key(pod), *(str(h) for h in hashes))
        pipe.sadd(self._pods_key, pod)
        with unavailable_on_failure(self._client, "RedisIndex.add"):
            pipe.execute()

    def remove(self, pod: str, tier: str, hashes: Sequence[int]) -> None:
        field = f"{pod}|{check_tier(tier)}"
        if not hashes:
            return
        keys = [self._pod_key(pod), self._stats_key, *(self._block_key(h) for h in hashes)]
        pod_fields = [f"{pod}|{t}" for t in TIERS]
        with unavailable_on_failure(self._client, "RedisIndex.remove"):
            self._remove(keys=keys, args=[field, len(TIERS), *pod_fields, *hashes])

    def clear_pod(self, pod: str) -> None:
        with unavailable_on_failure(self._client, "RedisIndex.clear_pod"):
            self._clear_pod(pod)

    def _clear_pod(self, pod: str) -> None:
        pipe = self._client.pipeline(transaction=True)
        pipe.smembers(self._pod_key(pod))
        pipe.delete(self._pod_key(pod))
        pipe.srem(self._pods_key, pod)
        members, *_ = pipe.execute()
        fields = [f"{pod}|{t}" for t in TIERS]
        members = list(members)
        for start in range(0, len(members), _CLEAR_CHUNK):
            pipe = self._client.pipeline(transaction=False)
            for member in members[start : start + _CLEAR_CHUNK]:
                pipe.hdel(f"{self.namespace}:blk:{member}", *fields)
            pipe.execute()

    def lookup_prefix(
        self, hashes: Sequence[int], pods: Collection[str] | None = None
    ) -> dict[str, PrefixHit]:
        if not hashes:
            return {}
        pipe = self._client.pipeline(transaction=False)
        for block_hash in hashes:
            key = self._block_key(block_hash)
            pipe.hgetall(key)
            if self.ttl_ms is not None:
                pipe.pexpire(key, self.ttl_ms)  # a lookup is a use; a no-op on a missing key
        with unavailable_on_failure(self._client, "RedisIndex.lookup_prefix"):
            replies = pipe.execute()
        entries = replies[:: 1 if self.ttl_ms is None else 2]
        return longest_prefixes(_holders(entries), pods)

    def stats(self) -> IndexStats:
        with unavailable_on_failure(self._client, "RedisIndex.stats"):
            pipe = self._client.pipeline(transaction=False)
            pipe.smembers(self._pods_key)
            pipe.hgetall(self._stats_key)
            pods, counters = pipe.execute()
            pipe = self._client.pipeline(transaction=False)
            for pod in pods:
                pipe.scard(self._pod_key(pod))
            sizes = [size for size in pipe.execute() if size > 0]
        return IndexStats(
            # an upper bound: pod-set members whose block key expired still count
            num_entries=sum(sizes),
            num_pods=len(sizes),
            num_blocks=None,  # would need a SCAN over every block key
            num_evictions=0,  # expirations happen inside Redis
            num_unknown_removals=int(counters.get("unknown_removals", 0)),
        )

    def close(self) -> None:
        self._client.close()


def _holders(entries: Iterable[dict[str, str]]) -> Iterable[dict[str, str]]:
    """{pod: best tier} per block from HGETALL replies; stops at the first block nobody holds."""
    for fields in entries:
        tiers: dict[str, list[str]] = {}
        for field, count in fields.items():
            pod, _, tier = field.rpartition("|")  # a tier never has "|"; a pod id may
            if int(count) > 0 and tier in TIERS:
                tiers.setdefault(pod, []).append(tier)
        if not tiers:
            return
        yield {pod: best_tier(held) for pod, held in tiers.items()}
