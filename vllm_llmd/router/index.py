"""The router's block index: which pod holds which block, in which tier, how many times.

    block hash (EventBlockHash, the 64-bit int vLLM publishes)
      -> pod id
        -> tier ("GPU" | "CPU" | "STORAGE": vLLM's medium names)
          -> reference count

The index is the sole owner of this state (llm-d's split: subscriber -> ingestor -> index ->
scorer). Backends implement `Index`; every method is thread-safe.

Write side (called by `ingest.EventIngestor`, one writer per pod):
- `add(pod, tier, hashes)`: BlockStored. One reference per hash: vLLM does not dedupe, two
  requests that cache the same prefix both publish it, and each later eviction is published.
- `remove(pod, tier, hashes)`: BlockRemoved. One reference off per hash; at 0 the entry goes.
  Removing what the index does not hold is a no-op, counted (`num_unknown_removals`).
- `clear_pod(pod)`: AllBlocksCleared, an engine restart, or the pod left: all its entries go.

Read side (called by the scorer for every request):
- `lookup_prefix(hashes, pods=None)`: for a request's consecutive block hashes, each pod's
  longest run from the first hash (it stops at the pod's first miss, as llm-d's Index.Lookup
  does) and the best tier of every block in it (GPU > CPU > STORAGE). Pods without the first
  block are absent from the answer.
- `stats()`: sizes and counters, for metrics.

Backends: `InMemoryIndex` here (one process, LRU-bounded), `redis_index.RedisIndex` (shared by
router replicas).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice

from vllm_llmd.events.model import MEDIUM_CPU, MEDIUM_GPU, MEDIUM_STORAGE

# Best first: a hit in GPU is served at once, CPU costs a host->device copy, STORAGE a disk read.
TIERS = (MEDIUM_GPU, MEDIUM_CPU, MEDIUM_STORAGE)
TIER_RANK = {tier: rank for rank, tier in enumerate(TIERS)}


@dataclass(frozen=True, slots=True)
class PrefixHit:
    """One pod's cached prefix of a request: `num_blocks` consecutive blocks from the first."""

    num_blocks: int
    # best tier of each of those blocks (len == num_blocks)
    tiers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class IndexStats:
    """A snapshot of an index's size and counters."""

    # (block, pod) pairs held, whatever the tiers
    num_entries: int
    # pods holding at least one block
    num_pods: int
    # distinct block hashes held; None where counting them would need a scan (Redis)
    num_blocks: int | None
    # blocks dropped by the backend's bound (LRU), not by events
    num_evictions: int
    # remove() of a (block, pod, tier) the index did not hold
    num_unknown_removals: int


def check_tier(tier: str) -> str:
    """`tier` if it is one of TIERS; ValueError otherwise."""
    if tier not in TIER_RANK:
        raise ValueError(f"unknown tier {tier!r}; an index holds one of {TIERS}")
    return tier


def best_tier(tiers: Iterable[str]) -> str:
    """The fastest of the tiers a pod holds a block in."""
    return min(tiers, key=TIER_RANK.__getitem__)


def _best_tier(tiers: Mapping[str, int]) -> str:
    """`best_tier` of a pod's {tier: references}; most blocks are in one tier, so no min()."""
    if len(tiers) == 1:
        return next(iter(tiers))
    return best_tier(tiers)


def longest_prefixes(
    blocks: Iterable[Mapping[str, str]], pods: Collection[str] | None = None
) -> dict[str, PrefixHit]:
    """Each pod's consecutive run from the first block, given {pod: best tier} per block.

    `blocks` is read lazily and no further than the last pod still in a run, so a backend may
    produce it block by block. `pods`, when given, limits the answer to those pods.
    """
    runs: dict[str, list[str]] = {}
    active: set[str] = set()  # pods whose run reaches the current block
    for position, holders in enumerate(blocks):
        if position == 0:
            runs = {p: [t] for p, t in holders.items() if pods is None or p in pods}
            active = set(runs)
        else:
            active = {p for p in active if p in holders}
            for pod in active:
                runs[pod].append(holders[pod])
        if not active:
            break
    return {pod: PrefixHit(len(tiers), tuple(tiers)) for pod, tiers in runs.items()}


class Index(ABC):
    """Block hash -> pod -> tier -> reference count. Thread-safe; see the module docstring."""

    @abstractmethod
    def add(self, pod: str, tier: str, hashes: Sequence[int]) -> None:
        """One reference per hash for (pod, tier); a hash listed twice counts twice."""

    @abstractmethod
    def remove(self, pod: str, tier: str, hashes: Sequence[int]) -> None:
        """One reference off per hash; unknown (hash, pod, tier) entries are counted, not errors."""

    @abstractmethod
    def clear_pod(self, pod: str) -> None:
        """Forget every block of `pod`, in every tier. Unknown pods are a no-op."""

    @abstractmethod
    def lookup_prefix(
        self, hashes: Sequence[int], pods: Collection[str] | None = None
    ) -> dict[str, PrefixHit]:
        """Per pod, its cached run of `hashes` from the first (see `longest_prefixes`).

        Args:
            hashes: a request's block hashes, in order (PrefixHasher.event_hashes).
            pods: only these pods; None for every pod.

        Returns:
            {pod: PrefixHit} for every pod that holds at least the first block.
        """

    @abstractmethod
    def stats(self) -> IndexStats:
        """Current sizes and counters."""

    def epoch(self) -> str:
        """What names the index's content: it changes when that content was lost behind its
        writers' backs (a Redis restarted empty), so that they replay their pods into it. In
        this process it never changes. Raises what the index raises when it is down."""
        return ""

    def close(self) -> None:  # noqa: B027 (optional hook: nothing to release in memory)
        """Release connections. Idempotent."""


class InMemoryIndex(Index):
    """An `Index` in this process: one lock, at most `max_entries` block hashes, LRU.

    A hash is "used" when it is added and when a lookup finds it in some pod's run; past
    `max_entries` hashes, the least recently used one goes with all its pods' entries (counted
    in `num_evictions`). The bound is on hashes, not bytes: an entry is a few hundred bytes.
    """

    def __init__(self, max_entries: int = 1_000_000) -> None:
        if max_entries <= 0:
            raise ValueError(f"max_entries must be > 0, got {max_entries}")
        self.max_entries = max_entries
        self._lock = threading.Lock()
        # hash -> pod -> tier -> count; order is recency, least recently used first
        self._blocks: OrderedDict[int, dict[str, dict[str, int]]] = OrderedDict()
        # pod -> the hashes it holds in any tier, so clear_pod does not scan every block
        self._pod_blocks: dict[str, set[int]] = {}
        self._num_evictions = 0
        self._num_unknown_removals = 0

    def add(self, pod: str, tier: str, hashes: Sequence[int]) -> None:
        check_tier(tier)
        if not hashes:
            return
        with self._lock:
            held = self._pod_blocks.setdefault(pod, set())
            for block_hash in hashes:
                tiers = self._blocks.setdefault(block_hash, {}).setdefault(pod, {})
                tiers[tier] = tiers.get(tier, 0) + 1
                held.add(block_hash)
                self._blocks.move_to_end(block_hash)
            self._evict_over_bound()

    def remove(self, pod: str, tier: str, hashes: Sequence[int]) -> None:
        check_tier(tier)
        with self._lock:
            for block_hash in hashes:
                pods = self._blocks.get(block_hash)
                tiers = pods.get(pod) if pods else None
                if not tiers or tier not in tiers:
                    self._num_unknown_removals += 1
                    continue
                tiers[tier] -= 1
                if tiers[tier] > 0:
                    continue
                del tiers[tier]
                if not tiers:
                    self._forget(block_hash, pod)

    def clear_pod(self, pod: str) -> None:
        with self._lock:
            for block_hash in list(self._pod_blocks.get(pod, ())):
                self._forget(block_hash, pod)

    def lookup_prefix(
        self, hashes: Sequence[int], pods: Collection[str] | None = None
    ) -> dict[str, PrefixHit]:
        with self._lock:
            hits = self._runs(hashes, pods)
            longest = max((hit.num_blocks for hit in hits.values()), default=0)
            for block_hash in hashes[:longest]:  # a lookup hit is a use
                if block_hash in self._blocks:
                    self._blocks.move_to_end(block_hash)
            return hits

    def stats(self) -> IndexStats:
        with self._lock:
            return IndexStats(
                num_entries=sum(len(held) for held in self._pod_blocks.values()),
                num_pods=len(self._pod_blocks),
                num_blocks=len(self._blocks),
                num_evictions=self._num_evictions,
                num_unknown_removals=self._num_unknown_removals,
            )

    # ---- under self._lock ------------------------------------------------------------------

    def _runs(self, hashes: Sequence[int], pods: Collection[str] | None) -> dict[str, PrefixHit]:
        """`longest_prefixes` of `hashes`, read straight from the blocks: each pod holding the
        first block walks its own run, so a block's best tier is found only for the pods whose
        run reaches it (every request looks up, so this is the router's hot path)."""
        first = self._blocks.get(hashes[0]) if hashes else None
        if not first:
            return {}
        blocks = self._blocks
        hits = {}
        for pod, tiers in first.items():
            if pods is not None and pod not in pods:
                continue
            run = [_best_tier(tiers)]
            for block_hash in islice(hashes, 1, None):
                holders = blocks.get(block_hash)
                held = holders.get(pod) if holders else None
                if held is None:
                    break
                run.append(_best_tier(held))
            hits[pod] = PrefixHit(len(run), tuple(run))
        return hits

    def _forget(self, block_hash: int, pod: str) -> None:
        """Drop the (block, pod) entry in every tier, and the block once no pod holds it."""
        pods = self._blocks[block_hash]
        del pods[pod]
        if not pods:
            del self._blocks[block_hash]
        held = self._pod_blocks[pod]
        held.discard(block_hash)
        if not held:
            del self._pod_blocks[pod]

    def _evict_over_bound(self) -> None:
        while len(self._blocks) > self.max_entries:
            block_hash, pods = self._blocks.popitem(last=False)
            for pod in pods:
                held = self._pod_blocks[pod]
                held.discard(block_hash)
                if not held:
                    del self._pod_blocks[pod]
            self._num_evictions += 1
