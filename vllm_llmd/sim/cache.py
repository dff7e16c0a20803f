"""A simulated pod's prefix cache: blocks by hash, LRU eviction, an optional host tier.

Modelled on vLLM's block pool. A block a running request references is in use; when the last
reference goes, a cached block joins the free queue (least recently freed first) and stays
findable until a new allocation evicts it. A request's tail blocks are freed first, so they are
evicted first (vLLM frees in reverse order). Blocks never cached (the part of a request's blocks
past its last full prompt block, or a block another request cached first) are private: they
count toward usage and simply vanish when freed.

With a host tier, a block evicted from the device is kept on the host (its own LRU), and a
request whose device run stops may continue its run there, paying a load per block.

Every change to what is cached is queued as a KV event (BlockStored / BlockRemoved with the
tier as `medium`), which the pod publishes after each engine step.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import cast

from vllm_llmd.events.model import MEDIUM_CPU, MEDIUM_GPU, BlockRemoved, BlockStored, Event
from vllm_llmd.hashing import EventBlockHash

# the simulator keeps hashes as plain ints; an event's are EventBlockHash (the same ints)
_Hashes = tuple[EventBlockHash, ...]


@dataclass(slots=True)
class Holding:
    """The blocks one admitted request holds."""

    # cached blocks it references, in prompt order
    shared: list[int] = field(default_factory=list)
    # blocks it holds that no hash names (yet)
    num_private: int = 0


@dataclass(frozen=True, slots=True)
class Hit:
    """A request's cached run at admission: device blocks, then host blocks after them."""

    device_blocks: int
    host_blocks: int


class PrefixCache:
    """Device blocks (capacity_blocks) with LRU eviction, and host blocks (LRU) behind them."""

    def __init__(self, capacity_blocks: int, block_size: int, host_capacity_blocks: int = 0):
        if capacity_blocks <= 0 or block_size <= 0 or host_capacity_blocks < 0:
            raise ValueError("need capacity_blocks > 0, block_size > 0, host_capacity_blocks >= 0")
        self.capacity_blocks = capacity_blocks
        self.block_size = block_size
        self.host_capacity_blocks = host_capacity_blocks
        # blocks referenced by running requests, cached or private
        self.num_used = 0
        # cached device blocks -> references; those at 0 are also in _free
        self._refs: dict[int, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict()  # eviction order, first out first
        self._host: OrderedDict[int, None] = OrderedDict()
        self._events: list[Event] = []

    # ---- reads ---------------------------------------------------------------------------

    @property
    def usage(self) -> float:
        """Share of device blocks in use (vLLM's kv_cache_usage_perc: free cached blocks are
        free)."""
        return min(1.0, self.num_used / self.capacity_blocks)

    def hit(self, hashes: list[int]) -> Hit:
        """The run of `hashes` cached from the first: on the device, then on the host."""
        device = 0
        refs = self._refs
        for block_hash in hashes:
            if block_hash not in refs:
                break
            device += 1
        host = 0
        for block_hash in hashes[device:]:
            if block_hash not in self._host or block_hash in refs:
                break
            host += 1
        return Hit(device, host)

    def can_allocate(self, hashes: list[int], num_blocks: int, hit: Hit) -> bool:
        """Room for a request of num_blocks whose first hit.device_blocks are cached."""
        empty = self.capacity_blocks - self.num_used - len(self._free)
        refs = self._refs
        reused_free = sum(1 for h in hashes[: hit.device_blocks] if refs[h] == 0)
        evictable = len(self._free) - reused_free
        return num_blocks - hit.device_blocks <= empty + evictable

    # ---- writes --------------------------------------------------------------------------

    def allocate(self, hashes: list[int], num_blocks: int, hit: Hit) -> Holding:
        """Reference the hit, load its host part onto the device, hold the rest as private."""
        holding = Holding()
        for block_hash in hashes[: hit.device_blocks]:
            self._ref(block_hash)
            holding.shared.append(block_hash)
        loaded = hashes[hit.device_blocks : hit.device_blocks + hit.host_blocks]
        for block_hash in loaded:  # a host copy stays on the host (vLLM's offloading does)
            self._host.move_to_end(block_hash)
        self._make_room(num_blocks - hit.device_blocks)
        for block_hash in loaded:
            self._refs[block_hash] = 1
            self.num_used += 1
            holding.shared.append(block_hash)
        if loaded:
            self._queue(True, MEDIUM_GPU, loaded)
        holding.num_private = num_blocks - len(holding.shared)
        self.num_used += holding.num_private
        return holding

    def cache(self, holding: Holding, hashes: list[int]) -> None:
        """The request computed the blocks `hashes` (its next full blocks, in order): each one
        not cached yet becomes cached; one already cached stays private (vLLM keeps one)."""
        new = []
        for block_hash in hashes:
            if block_hash in self._refs or holding.num_private == 0:
                continue
            self._refs[block_hash] = 1
            holding.num_private -= 1
            holding.shared.append(block_hash)
            new.append(block_hash)
        if new:
            self._queue(True, MEDIUM_GPU, new)

    def free(self, holding: Holding) -> None:
        """The request finished: drop its references, tail first."""
        for block_hash in reversed(holding.shared):
            refs = self._refs[block_hash] - 1
            self._refs[block_hash] = refs
            if refs == 0:
                self._free[block_hash] = None
                self.num_used -= 1
        self.num_used -= holding.num_private
        holding.shared, holding.num_private = [], 0

    def receive(self, hashes: list[int]) -> int:
        """Blocks pulled from another pod (a hot-prefix copy), in prompt order: each not on the
        device becomes a cached block no request holds, the most recently freed (the tail
        first, as `free` leaves a prompt), as far as room can be made. How many it took."""
        new = [block_hash for block_hash in hashes if block_hash not in self._refs]
        self._make_room(len(new))
        new = new[: max(0, self.capacity_blocks - self.num_used - len(self._free))]
        for block_hash in reversed(new):
            self._refs[block_hash] = 0
            self._free[block_hash] = None
        self._queue(True, MEDIUM_GPU, new)
        return len(new)

    def take_events(self) -> list[Event]:
        """The KV events queued since the last call, in order."""
        events, self._events = self._events, []
        return events

    # ---- internals -----------------------------------------------------------------------

    def _ref(self, block_hash: int) -> None:
        refs = self._refs[block_hash]
        if refs == 0:
            del self._free[block_hash]
            self.num_used += 1
        self._refs[block_hash] = refs + 1

    def _make_room(self, num_blocks: int) -> None:
        """Evict free cached blocks (least recently freed first) until num_blocks fit."""
        over = self.num_used + len(self._free) + num_blocks - self.capacity_blocks
        if over <= 0:
            return
        evicted = []
        for _ in range(min(over, len(self._free))):
            block_hash, _ = self._free.popitem(last=False)
            del self._refs[block_hash]
            evicted.append(block_hash)
        self._queue(False, MEDIUM_GPU, evicted)
        if self.host_capacity_blocks:
            self._offload(evicted)

    def _offload(self, hashes: list[int]) -> None:
        stored = []
        for block_hash in hashes:
            if block_hash in self._host:
                self._host.move_to_end(block_hash)
            else:
                self._host[block_hash] = None
                stored.append(block_hash)
        self._queue(True, MEDIUM_CPU, stored)
        dropped = []
        while len(self._host) > self.host_capacity_blocks:
            dropped.append(self._host.popitem(last=False)[0])
        self._queue(False, MEDIUM_CPU, dropped)

    def _queue(self, stored: bool, medium: str, hashes: list[int]) -> None:
        """Queue an event, merged into the last one when it is of the same kind and tier."""
        if not hashes:
            return
        last = self._events[-1] if self._events else None
        kind = BlockStored if stored else BlockRemoved
        if isinstance(last, kind) and last.medium == medium:
            hashes = [*last.block_hashes, *hashes]
            self._events.pop()
        if stored:
            # the index reads hashes and tier only: tokens are left out (the simulated tokens
            # are not a model's, and carrying them costs memory for nothing)
            event: Event = BlockStored(
                block_hashes=cast(_Hashes, tuple(hashes)),
                parent_block_hash=None,
                token_ids=(),
                block_size=self.block_size,
                medium=medium,
            )
        else:
            event = BlockRemoved(block_hashes=cast(_Hashes, tuple(hashes)), medium=medium)
        self._events.append(event)
