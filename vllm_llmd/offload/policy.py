"""Eviction policies of the offload tiers: which block a full tier gives up first.

A tier owns one `CachePolicy` over the keys (vLLM block hashes) it holds, and tells it every
change; the policy only orders keys, it never holds bytes or decides when to evict:

    insert(key)                 a block was stored (the key must be new)
    touch(key)                  a hit, or a re-store of a held key: refreshes its value
    remove(key)                 the block is gone (evicted, deleted, found corrupt)
    choose_victim(is_evictable) the least valuable key that may go now, or None; the policy
                                keeps it until the tier calls remove() once the bytes are freed

`is_evictable` lets the tier veto keys it has pinned (being loaded or stored) without the
policy knowing about pins. Misuse (inserting a held key, touching or removing an unknown one)
raises KeyError: it means the tier's bookkeeping drifted, which must not pass silently.

Policies, by name for `make_policy`:

- "lru": least recently used first. O(1) insert/touch/remove; the victim search walks from
  the LRU end past pinned keys, so it costs O(1 + number of pinned keys at that end).

A new policy is one `CachePolicy` subclass plus one entry in `_POLICIES`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable

from vllm_llmd.hashing import BlockHash


class CachePolicy(ABC):
    """Orders a tier's keys by how much they are worth keeping. Not thread-safe: the tier
    calls it under its own lock."""

    @abstractmethod
    def insert(self, key: BlockHash) -> None:
        """Start tracking a newly stored key. KeyError if it is already tracked."""

    @abstractmethod
    def touch(self, key: BlockHash) -> None:
        """Record a use of a tracked key (a hit or a re-store). KeyError if unknown."""

    @abstractmethod
    def remove(self, key: BlockHash) -> None:
        """Stop tracking a key. KeyError if unknown."""

    @abstractmethod
    def choose_victim(self, is_evictable: Callable[[BlockHash], bool]) -> BlockHash | None:
        """The least valuable tracked key for which `is_evictable(key)` is true, or None.

        The key stays tracked; the tier calls `remove` once it has freed the block.
        """

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __contains__(self, key: object) -> bool: ...


class LRUPolicy(CachePolicy):
    """Least recently used first."""

    def __init__(self) -> None:
        # least recently used first, most recently used last; values unused
        self._order: OrderedDict[BlockHash, None] = OrderedDict()

    def insert(self, key: BlockHash) -> None:
        if key in self._order:
            raise KeyError(f"LRU policy already tracks key {key.hex()}")
        self._order[key] = None

    def touch(self, key: BlockHash) -> None:
        self._order.move_to_end(key)  # KeyError if unknown

    def remove(self, key: BlockHash) -> None:
        del self._order[key]

    def choose_victim(self, is_evictable: Callable[[BlockHash], bool]) -> BlockHash | None:
        for key in self._order:
            if is_evictable(key):
                return key
        return None

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order


_POLICIES: dict[str, type[CachePolicy]] = {
    "lru": LRUPolicy,
}


def make_policy(name: str) -> CachePolicy:
    """A new, empty policy by its config name (see the module docstring for the names)."""
    try:
        policy_class = _POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown offload cache policy {name!r}; known policies: {', '.join(sorted(_POLICIES))}"
        ) from None
    return policy_class()
