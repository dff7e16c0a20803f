"""What a `Subscriber` hands its owner, per source: a decoded batch, a restart, or a gap."""

from __future__ import annotations

import msgspec

from vllm_llmd.events.model import Event, EventBatch

__all__ = ["Gap", "ReceivedBatch", "Reset", "Update"]


class ReceivedBatch(msgspec.Struct, frozen=True):
    """One decoded batch of one source."""

    source: str
    seq: int
    batch: EventBatch
    replayed: bool = False

    @property
    def events(self) -> tuple[Event, ...]:
        """The batch's events, in order."""
        return self.batch.events


class Reset(msgspec.Struct, frozen=True):
    """The source's engine restarted (seq went back to `seq`): forget its blocks."""

    source: str
    seq: int
    reason: str = "restart"


class Gap(msgspec.Struct, frozen=True):
    """Batches first_seq..last_seq (inclusive) of the source are lost."""

    source: str
    first_seq: int
    last_seq: int


Update = ReceivedBatch | Reset | Gap
