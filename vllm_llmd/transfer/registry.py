"""Prefill side: which finished requests' blocks are held for a decode instance, and until when.

One `PendingSend` per transfer, a small state machine:

    WAITING --read--> READING --read done--> WAITING --release--> RELEASED
       |                                        |
       +------------- lease expired ------------+--> EXPIRED

A transfer that several decode workers read (unequal TP sizes) is RELEASED at the last of
their releases: the first release states how many there are (`num_consumers`), and the lease
still bounds a consumer that never comes.

The engine frees a transfer's blocks only after `take_finished` returned its request id, and a
transfer in READING is never finished: no block is freed while a read copies it. Every read
renews the lease. The side-channel thread and the engine's worker thread share it under a lock.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


class SendOutcome(str, enum.Enum):
    """How a finished transfer ended (for counters and logs)."""

    DONE = "done"  # the decode side read it and released it
    FAILED = "failed"  # the decode side gave up and released it (`PendingSend.reason` says why)
    EXPIRED = "expired"  # nobody released it within the lease


class SendState(enum.IntEnum):
    WAITING = enum.auto()
    READING = enum.auto()
    # anything from here on is finished: the blocks may be freed
    RELEASED = enum.auto()
    EXPIRED = enum.auto()


@dataclass(slots=True)
class PendingSend:
    request_id: str
    transfer_id: str
    block_ids: frozenset[int]
    # time.monotonic() after which the blocks are freed unless a read renews it
    expires_at: float
    state: SendState = SendState.WAITING
    # how the transfer ended (None until it did), and why a failed one failed
    outcome: SendOutcome | None = None
    reason: str = ""
    # releases still to come before the blocks may be freed (None: none came yet)
    releases_left: int | None = None


class SendRegistry:
    """Thread-safe table of transfers a prefill worker serves."""

    def __init__(self, lease_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.lease_s = lease_s
        self._clock = clock
        self._lock = threading.Lock()
        self._by_transfer: dict[str, PendingSend] = {}

    def add(self, request_id: str, transfer_id: str, block_ids: list[int]) -> None:
        with self._lock:
            self._by_transfer[transfer_id] = PendingSend(
                request_id, transfer_id, frozenset(block_ids), self._clock() + self.lease_s
            )

    def begin_read(self, transfer_id: str, block_ids: list[int]) -> str | None:
        """Pin the transfer for a read of block_ids; returns an error text, or None if ok."""
        with self._lock:
            send = self._by_transfer.get(transfer_id)
            if send is None or send.state >= SendState.RELEASED:
                return "unknown or finished transfer id"
            if send.state == SendState.READING:
                return "a read of this transfer is already in progress"
            if not send.block_ids.issuperset(block_ids):
                return "requested blocks that this transfer does not hold"
            if len(set(block_ids)) != len(block_ids):
                # a read's size is its id count: repeats would copy one block without bound
                return "requested a block more than once"
            send.state = SendState.READING
            send.expires_at = max(send.expires_at, self._clock() + self.lease_s)
            return None

    def end_read(self, transfer_id: str) -> None:
        """The read copied its blocks out; the transfer may now be released or expire."""
        with self._lock:
            send = self._by_transfer[transfer_id]
            assert send.state == SendState.READING, send
            send.state = SendState.WAITING
            send.expires_at = max(send.expires_at, self._clock() + self.lease_s)

    def release(
        self, transfer_id: str, success: bool, reason: str = "", num_consumers: int = 1
    ) -> bool:
        """A decode worker is done with the blocks (one of num_consumers, as the first release
        says). False if the id is unknown or finished."""
        with self._lock:
            send = self._by_transfer.get(transfer_id)
            if send is None or send.state != SendState.WAITING:
                return False
            if send.releases_left is None:
                send.releases_left = max(1, num_consumers)
            send.releases_left -= 1
            if not success and send.outcome is None:  # the first failure says why
                send.outcome, send.reason = SendOutcome.FAILED, reason
            if send.releases_left == 0:
                send.state = SendState.RELEASED
                send.outcome = send.outcome or SendOutcome.DONE
            return True

    def take_finished(self) -> list[PendingSend]:
        """Drain transfers whose blocks may be freed now (released, or lease expired)."""
        now = self._clock()
        finished = []
        with self._lock:
            for transfer_id, send in list(self._by_transfer.items()):
                if send.state == SendState.WAITING and send.expires_at <= now:
                    send.state, send.outcome = SendState.EXPIRED, SendOutcome.EXPIRED
                if send.state >= SendState.RELEASED:
                    finished.append(self._by_transfer.pop(transfer_id))
        return finished

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_transfer)

    def num_blocks_held(self) -> int:
        with self._lock:
            return sum(len(s.block_ids) for s in self._by_transfer.values())
