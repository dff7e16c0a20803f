"""What the router knows of one pod (`PodState`, kept by `pods.PodRegistry`), and one request
in flight to it (`Sending`): the counts a decision reads as the pod's load."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from vllm_llmd.router.config import PodSpec
from vllm_llmd.router.load import ArrivalRate, PodLoad

__all__ = ["PodState", "Sending", "count_own_blocks", "pods_without_room"]


@dataclass
class PodState:
    spec: PodSpec
    healthy: bool = False
    load: PodLoad = field(default_factory=PodLoad)
    # requests this router has sent to the pod and not yet finished; of those, the ones no
    # answer byte came from yet, and their uncached prompt tokens (see `sending`)
    in_flight: int = 0
    prefilling: int = 0
    prefill_tokens: int = 0
    # when the pod began on the prefill work now ahead of a new request: when that work
    # arrived at an empty queue, or the pod's last first token since (its engine finished a
    # step then and took the queue on). None: no prefill work ahead.
    ahead_since: float | None = None
    # how fast this router has been sending it requests (each `Sending` counts one)
    arrivals: ArrivalRate = field(default_factory=ArrivalRate)
    # the KV blocks its requests in flight hold: each prompt's full blocks by hash (with how
    # many requests hold it), and the blocks that are each request's own (partial, answer)
    held: Counter[int] = field(default_factory=Counter)
    held_own: int = 0
    # the clock of ahead_since (the simulator's is simulated time)
    clock: Callable[[], float] = time.monotonic
    subscribed: bool = False
    # the pod's tokens and block hashes match the router's; None: not checked since it joined
    hashes_ok: bool | None = None
    # the ingestor's remove_pod, running off the event loop; awaited before following again
    removal: asyncio.Future[None] | None = None
    # a poll of this pod is running (a new pod's first poll may overlap the periodic one)
    polling: bool = False
    # discovery removed it; a poll still running must not bring it back
    removed: bool = False
    # /health checks in a row that timed out
    slow_checks: int = 0
    # why it is out of rotation, its events not followed, or its load not read (each logged
    # when it changes, so a pod that keeps answering badly does not spam)
    health_problem: str = ""
    events_problem: str = ""
    # the pod was found to publish no KV events (logged once per pod)
    events_off_logged: bool = False
    load_problem: str = ""

    def current_load(self) -> PodLoad:
        """Its last scraped load, with this router's own counts (in flight, prefilling, sent
        lately)."""
        load = self.load
        return PodLoad(
            load.num_waiting,
            load.num_running,
            load.kv_usage,
            self.in_flight,
            self.prefilling,
            self.prefill_tokens,
            self.arrivals.per_second(),
            0.0 if self.ahead_since is None else max(0.0, self.clock() - self.ahead_since),
            kv_blocks=load.kv_blocks,
            held_blocks=len(self.held) + self.held_own,
        )

    def lacks_room(self, blocks: Sequence[int], own_blocks: int) -> bool:
        """A request with these full prompt blocks and `own_blocks` more cannot start here now:
        with what this router's requests hold, its new blocks overflow the pod's KV cache
        (the pod would queue it until one ends, and evict cached prefixes meanwhile). Never
        on a pod that holds nothing for the router or whose size is not known: there it waits
        for no request of ours."""
        capacity, held = self.load.kv_blocks, len(self.held) + self.held_own
        if not capacity or not held or held + len(blocks) + own_blocks <= capacity:
            return False  # the common case, without a look-up per block
        new = sum(1 for block in blocks if block not in self.held)
        return held + new + own_blocks > capacity


class Sending:
    """One request in flight to a pod (`PodRegistry.sending`)."""

    def __init__(
        self,
        pod: PodState,
        prefill_tokens: int,
        blocks: Sequence[int] = (),
        own_blocks: int = 0,
        on_answering: Callable[[], None] | None = None,
    ) -> None:
        """`blocks`: the prompt's full blocks (hashes), `own_blocks`: the KV blocks it needs
        besides (its partial block, its answer): what it holds of the pod's KV cache;
        `on_answering()` runs once its prefill work has left the pod's count."""
        self.pod, self.prefill_tokens = pod, prefill_tokens
        self.on_answering = on_answering
        self.blocks, self.own_blocks = tuple(blocks), max(0, own_blocks)
        self._prefilling = True
        pod.arrivals.add()
        pod.in_flight += 1
        pod.prefilling += 1
        if prefill_tokens and not pod.prefill_tokens:
            pod.ahead_since = pod.clock()  # work arrives at an empty queue
        pod.prefill_tokens += prefill_tokens
        pod.held.update(self.blocks)
        pod.held_own += self.own_blocks

    def answering(self) -> None:
        """The pod began answering: its prefill is no longer ahead of new requests (once)."""
        if self._prefilling:
            self._prefilling = False
            pod = self.pod
            pod.prefilling -= 1
            pod.prefill_tokens -= self.prefill_tokens
            # a first token ends an engine step: what is still ahead starts from now
            pod.ahead_since = pod.clock() if pod.prefill_tokens else None
            if self.on_answering is not None:
                self.on_answering()

    def ended(self) -> None:
        """The request is over (answered or not): no longer in flight."""
        self.answering()
        pod = self.pod
        pod.in_flight -= 1
        pod.held.subtract(self.blocks)
        for block in self.blocks:
            if pod.held[block] <= 0:
                pod.held.pop(block, None)  # gone (a block twice in a prompt: already)
        pod.held_own -= self.own_blocks


def count_own_blocks(num_blocks: int, num_tokens: int, answer_tokens: int, block_size: int) -> int:
    """KV blocks a request of `num_tokens` prompt tokens (`num_blocks` full blocks) and
    `answer_tokens` needs besides its prompt's full blocks: its partial block and answer."""
    return max(0, -(-(num_tokens + answer_tokens) // block_size) - num_blocks)


def pods_without_room(
    loads: Mapping[str, PodLoad],
    states: Mapping[str, PodState],
    blocks: Sequence[int],
    own: int,
) -> frozenset[str]:
    """The pods where a request with these blocks lacks room (`PodState.lacks_room`), read
    from `loads` (theirs at this decision) first: only a pod where the router holds blocks and
    the whole request would not fit beside them is looked at block by block (at 256 pods, one
    pass over the loads, not a call per pod)."""
    need = len(blocks) + own
    tight = [
        pod
        for pod, load in loads.items()
        if load.held_blocks and load.kv_blocks and load.held_blocks + need > load.kv_blocks
    ]
    return frozenset(pod for pod in tight if pod in states and states[pod].lacks_room(blocks, own))
