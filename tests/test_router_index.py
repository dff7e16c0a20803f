"""The router's block index: one conformance suite run against every backend.

`index` is parametrized over the in-memory backend and Redis (a real redis-server started by
this module on a free loopback port, no persistence; each test gets its own namespace). Then
what only one backend has: the in-memory LRU bound, Redis shared by two instances and its TTL.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from vllm_llmd.devtools.server import free_port
from vllm_llmd.router.index import Index, InMemoryIndex, PrefixHit, best_tier, longest_prefixes

redis = pytest.importorskip("redis")
from vllm_llmd.router.redis_index import RedisIndex  # noqa: E402 (needs the redis client)

GPU, CPU, STORAGE = "GPU", "CPU", "STORAGE"


def redis_index(url: str, **kwargs) -> RedisIndex:
    return RedisIndex(url, namespace=f"test-{uuid.uuid4().hex[:8]}", **kwargs)


@pytest.fixture(params=["memory", "redis"])
def index(request) -> Iterator[Index]:
    if request.param == "memory":
        backend: Index = InMemoryIndex(max_entries=10_000)
    else:
        backend = redis_index(request.getfixturevalue("redis_url"))
    yield backend
    backend.close()


def hit(*tiers: str) -> PrefixHit:
    return PrefixHit(len(tiers), tiers)


# ---- conformance: every backend ----------------------------------------------------------------


def test_duplicates_are_reference_counted(index):
    index.add("a", GPU, [1, 2])
    index.add("a", GPU, [1, 2])  # a second request cached the same prefix
    index.remove("a", GPU, [1, 2])
    assert index.lookup_prefix([1, 2]) == {"a": hit(GPU, GPU)}
    index.remove("a", GPU, [2])
    assert index.lookup_prefix([1, 2]) == {"a": hit(GPU)}
    index.remove("a", GPU, [1])
    assert index.lookup_prefix([1, 2]) == {}
    stats = index.stats()
    assert (stats.num_entries, stats.num_pods, stats.num_unknown_removals) == (0, 0, 0)


def test_a_hash_listed_twice_in_one_batch_counts_twice(index):
    index.add("a", GPU, [7, 7])
    index.remove("a", GPU, [7])
    assert index.lookup_prefix([7]) == {"a": hit(GPU)}


def test_prefix_stops_at_each_pods_first_miss(index):
    index.add("a", GPU, [1, 2, 3, 5])  # misses 4: block 5 is no use without it
    index.add("b", GPU, [2, 3, 4])  # misses the first block: no prefix at all
    index.add("c", GPU, [1])
    index.add("d", GPU, [1, 2, 3, 4, 5, 6])
    assert index.lookup_prefix([1, 2, 3, 4, 5]) == {
        "a": hit(GPU, GPU, GPU),
        "c": hit(GPU),
        "d": hit(GPU, GPU, GPU, GPU, GPU),
    }
    assert index.lookup_prefix([9, 1]) == {}
    assert index.lookup_prefix([]) == {}


def test_best_tier_per_block(index):
    index.add("a", STORAGE, [1, 2, 3, 4])
    index.add("a", CPU, [1, 2, 3])
    index.add("a", GPU, [1, 2])
    index.add("b", CPU, [1])
    assert index.lookup_prefix([1, 2, 3, 4, 99]) == {
        "a": hit(GPU, GPU, CPU, STORAGE),
        "b": hit(CPU),
    }
    # each tier keeps its own count: the GPU copy goes, the CPU copy serves
    index.remove("a", GPU, [1, 2])
    assert index.lookup_prefix([1, 2, 3, 4])["a"] == hit(CPU, CPU, CPU, STORAGE)
    assert index.stats().num_entries == 5  # (block, pod) pairs, whatever the tiers


def test_pods_filter(index):
    index.add("a", GPU, [1, 2])
    index.add("b", CPU, [1])
    assert index.lookup_prefix([1, 2], pods={"b", "zz"}) == {"b": hit(CPU)}
    assert index.lookup_prefix([1, 2], pods=set()) == {}


def test_clear_pod_drops_only_that_pod_in_every_tier(index):
    index.add("a", GPU, [1, 2])
    index.add("a", STORAGE, [3])
    index.add("b", CPU, [1, 2, 3])
    index.clear_pod("a")
    assert index.lookup_prefix([1, 2, 3]) == {"b": hit(CPU, CPU, CPU)}
    stats = index.stats()
    assert (stats.num_entries, stats.num_pods) == (3, 1)
    index.clear_pod("a")  # twice, and unknown pods: no-ops
    index.clear_pod("nobody")
    index.add("a", GPU, [1])  # the pod comes back after a restart
    assert index.lookup_prefix([1])["a"] == hit(GPU)
    # a removal for a block cleared with the pod is unknown now
    index.remove("a", STORAGE, [3])
    assert index.stats().num_unknown_removals == 1


def test_unknown_removals_are_counted_no_ops(index):
    index.add("a", GPU, [1])
    index.remove("a", GPU, [2])  # unknown hash
    index.remove("b", GPU, [1])  # unknown pod
    index.remove("a", CPU, [1])  # held, but in another tier
    index.remove("a", GPU, [])
    assert index.lookup_prefix([1]) == {"a": hit(GPU)}
    assert index.stats().num_unknown_removals == 3
    index.remove("a", GPU, [1, 1])  # the second one is unknown: the count never goes below 0
    index.add("a", GPU, [1])
    assert index.lookup_prefix([1]) == {"a": hit(GPU)}
    assert index.stats().num_unknown_removals == 4


def test_unknown_tier_is_refused(index):
    with pytest.raises(ValueError, match="unknown tier 'HBM'"):
        index.add("a", "HBM", [1])
    with pytest.raises(ValueError, match="unknown tier"):
        index.remove("a", "gpu", [1])
    assert index.stats().num_entries == 0


def test_pod_ids_may_contain_the_field_separator(index):
    index.add("ns|pod-0", CPU, [1])
    index.add("pod", GPU, [1])
    assert index.lookup_prefix([1]) == {"ns|pod-0": hit(CPU), "pod": hit(GPU)}
    index.clear_pod("ns|pod-0")
    assert index.lookup_prefix([1]) == {"pod": hit(GPU)}


def test_concurrent_writers_and_readers(index):
    """Threads add and remove overlapping blocks; counts must balance, readers never fail."""
    index.add("a", GPU, [0])  # pinned: every reader must always see it
    shared = list(range(1, 9))
    stop = time.monotonic() + 1.0
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        try:
            own = [1000 * seed + i for i in range(4)]
            while time.monotonic() < stop:
                index.add("a", GPU, shared + own)
                index.add("b", CPU, own)
                index.remove("a", GPU, shared + own)
                index.remove("b", CPU, own)
        except BaseException as exc:
            errors.append(exc)

    def reader() -> None:
        try:
            while time.monotonic() < stop:
                hits = index.lookup_prefix([0, *shared])
                assert hits["a"].num_blocks >= 1 and hits["a"].tiers[0] == GPU
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(1, 4)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not errors, errors
    assert index.lookup_prefix([0, *shared]) == {"a": hit(GPU)}
    stats = index.stats()
    assert (stats.num_entries, stats.num_pods, stats.num_unknown_removals) == (1, 1, 0)


# ---- in-memory only -----------------------------------------------------------------------------


def test_in_memory_lru_bound_counts_evictions():
    index = InMemoryIndex(max_entries=3)
    index.add("a", GPU, [1, 2])
    index.add("b", CPU, [3])
    assert index.lookup_prefix([1]) == {"a": hit(GPU)}  # a hit is a use: 1 is now newest
    index.add("b", CPU, [4])  # over the bound: 2 is the least recently used
    assert index.lookup_prefix([1, 2]) == {"a": hit(GPU)}
    assert index.lookup_prefix([3, 4]) == {"b": hit(CPU, CPU)}
    index.add("c", GPU, [5, 6])  # evicts 1 then 3 (looked up before 4)
    assert index.lookup_prefix([1]) == {}
    assert index.lookup_prefix([4]) == {"b": hit(CPU)}
    stats = index.stats()
    assert (stats.num_blocks, stats.num_evictions) == (3, 3)
    assert (stats.num_entries, stats.num_pods) == (3, 2)  # pod a is gone with its last block
    index.remove("a", GPU, [1])  # evicted by the bound: unknown now, as for any backend
    assert index.stats().num_unknown_removals == 1


def test_in_memory_bound_must_be_positive():
    with pytest.raises(ValueError, match="max_entries"):
        InMemoryIndex(max_entries=0)


# ---- Redis only ---------------------------------------------------------------------------------


def test_two_redis_instances_share_one_index(redis_url):
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    first, second = RedisIndex(redis_url, namespace), RedisIndex(redis_url, namespace)
    other = redis_index(redis_url)  # another namespace sees nothing
    try:
        first.add("a", GPU, [1, 2])
        second.add("a", GPU, [2])
        assert second.lookup_prefix([1, 2]) == {"a": hit(GPU, GPU)}
        assert other.lookup_prefix([1, 2]) == {}
        second.remove("a", GPU, [2])
        assert first.lookup_prefix([1, 2]) == {"a": hit(GPU, GPU)}  # one reference is left
        second.clear_pod("a")
        assert first.lookup_prefix([1, 2]) == {}
        first.remove("a", GPU, [1])
        assert second.stats().num_unknown_removals == 1  # counters are shared too
    finally:
        for index in (first, second, other):
            index.close()


def test_redis_entries_expire_unless_used(redis_url):
    index = redis_index(redis_url, ttl_s=0.4)
    client = redis.Redis.from_url(redis_url)
    try:
        index.add("a", GPU, [1])
        index.add("a", GPU, [2])
        ttl_ms = client.pttl(f"{index.namespace}:blk:1")
        assert 0 < ttl_ms <= 400
        for _ in range(4):  # lookups keep block 1 alive past its first TTL
            time.sleep(0.2)
            assert index.lookup_prefix([1]) == {"a": hit(GPU)}
        assert index.lookup_prefix([2]) == {}  # nobody asked for 2: expired
        index.remove("a", GPU, [2])  # its late BlockRemoved is an unknown removal
        assert index.stats().num_unknown_removals == 1
    finally:
        client.close()
        index.close()


def test_redis_without_ttl_keeps_entries(redis_url):
    index = redis_index(redis_url, ttl_s=None)
    client = redis.Redis.from_url(redis_url)
    try:
        index.add("a", GPU, [1])
        assert client.pttl(f"{index.namespace}:blk:1") == -1  # no expiry
        assert index.lookup_prefix([1]) == {"a": hit(GPU)}
    finally:
        client.close()
        index.close()


def test_redis_unreachable_is_a_clear_error():
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"  # nobody listens there
    with pytest.raises(ConnectionError, match=r"cannot reach Redis at 127\.0\.0\.1:\d+/0") as err:
        RedisIndex(url, socket_timeout_s=1.0)
    assert "secret" not in str(err.value)


def test_redis_arguments_are_checked(redis_url):
    with pytest.raises(ValueError, match="namespace"):
        RedisIndex(redis_url, namespace="a b")
    with pytest.raises(ValueError, match="ttl_s"):
        RedisIndex(redis_url, ttl_s=0)


def test_in_memory_lookup_agrees_with_longest_prefixes_and_touches_the_hit():
    # InMemoryIndex walks each pod's run on its own dicts (its hot path); the answer must be
    # longest_prefixes' over every block's {pod: best tier}, for random contents and filters
    rng = random.Random(7)
    index = InMemoryIndex(max_entries=10_000)
    held: dict[int, dict[str, dict[str, int]]] = {}  # the same refcounts, kept by the test
    pods = ["a", "b", "c", "d"]
    chain = list(range(100, 130))
    for _ in range(400):
        pod, tier = rng.choice(pods), rng.choice([GPU, CPU, STORAGE])
        hashes = chain[rng.randrange(3) : rng.randrange(3, len(chain))]
        if rng.random() < 0.7:
            index.add(pod, tier, hashes)
            for h in hashes:
                tiers = held.setdefault(h, {}).setdefault(pod, {})
                tiers[tier] = tiers.get(tier, 0) + 1
        else:
            index.remove(pod, tier, hashes)
            for h in hashes:
                tiers = held.get(h, {}).get(pod, {})
                if tiers.get(tier):
                    tiers[tier] -= 1
                    if not tiers[tier]:
                        del tiers[tier]
                    if not tiers:  # as the index does: a pod added again comes last
                        del held[h][pod]
        query = chain[: rng.randrange(len(chain) + 1)]
        only = None if rng.random() < 0.5 else set(rng.sample(pods, rng.randrange(len(pods))))
        blocks = ({p: best_tier(t) for p, t in held.get(h, {}).items()} for h in query)
        expected = longest_prefixes(blocks, only)
        got = index.lookup_prefix(query, only)
        assert got == expected
        assert list(got) == list(expected)  # the same pod order, too
        longest = max((hit.num_blocks for hit in got.values()), default=0)
        if longest:  # a hit is a use: its blocks are now the most recently used
            assert list(index._blocks)[-longest:] == query[:longest]
