"""Events to index operations: one pod's KV-event update applied to an `Index` (and the
`SharedTierView`), counted in its `PodStats`. The ingestor's polling thread calls this; the
simulator and the scale benchmark call it directly.

    BlockStored       -> index.add(pod, tier, hashes)
    BlockRemoved      -> index.remove(pod, tier, hashes)
    AllBlocksCleared  -> index.clear_pod(pod)
    Reset             -> index.clear_pod(pod), then what follows (the engine restarted)
    Gap               -> counted and logged (the pod's view may be stale until it evicts)

An event's tier is its `medium`; None (older engines) means "GPU", the engine's own cache.
Medium SHARED (our connector's shared LMCache tier) is pod-independent: those events go to the
`SharedTierView` when one is given (and are skipped when not), never to the index. Events the
index refuses (an unknown medium) and failures of the index itself (Redis down) are counted
and logged (at most every 10 s per pod), never raised.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

from vllm_llmd.events.model import (
    MEDIUM_GPU,
    MEDIUM_SHARED,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
)
from vllm_llmd.events.updates import Gap, ReceivedBatch, Reset, Update
from vllm_llmd.log import ThrottledLog
from vllm_llmd.router.index import Index
from vllm_llmd.router.shared_view import SharedTierView

logger = logging.getLogger(__name__)

# How often a pod's failures, and its gaps, are logged (each one is counted regardless).
ERROR_LOG_INTERVAL_S = 10.0


@dataclass
class PodStats:
    """Counters of one pod's event stream, as `EventIngestor.stats()` reports them."""

    num_batches: int = 0
    num_events: int = 0
    # lost batch ranges, and the batches in them
    num_gaps: int = 0
    num_lost_batches: int = 0
    # engine restarts seen (seq went back): the pod's entries were cleared
    num_resets: int = 0
    # the pod's entries were rebuilt from its replay buffer: the index had lost events (it
    # failed to apply some) or all its content (a Redis restarted empty)
    num_resyncs: int = 0
    # events the index refused (unknown medium), and events lost to index failures
    num_bad_events: int = 0
    num_index_errors: int = 0
    # the subscriber itself failed (a transport bug); the pod is polled again next round
    num_poll_errors: int = 0
    # publisher clock (time.time()) of the last batch, and our clock when it arrived
    last_event_ts: float | None = None
    last_received_at: float | None = None
    # last_received_at - last_event_ts: how far behind the engine the index was (clock skew too)
    lag_s: float | None = None
    # errors, and gaps, are each logged at most every ERROR_LOG_INTERVAL_S (counted always)
    error_log: ThrottledLog = dataclasses.field(
        default_factory=lambda: ThrottledLog(logger, ERROR_LOG_INTERVAL_S), repr=False
    )
    gap_log: ThrottledLog = dataclasses.field(
        default_factory=lambda: ThrottledLog(logger, ERROR_LOG_INTERVAL_S), repr=False
    )

    def as_dict(self) -> dict[str, float | int | None]:
        """The public counters as a plain dict."""
        return {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if field.repr  # the counters, not the logs' throttles
        }


def apply_update(
    index: Index,
    pod_id: str,
    update: Update,
    stats: PodStats,
    shared: SharedTierView | None = None,
) -> None:
    """Apply one subscriber update of `pod_id` to `index` (and `shared`), counting it in
    `stats`."""
    if isinstance(update, Reset):
        stats.num_resets += 1
        _apply_event(index, pod_id, AllBlocksCleared(), stats)
    elif isinstance(update, Gap):
        stats.num_gaps += 1
        stats.num_lost_batches += update.last_seq - update.first_seq + 1
        stats.gap_log.warning(
            "%s: event batches %d..%d are lost; its index entries may be stale",
            pod_id,
            update.first_seq,
            update.last_seq,
        )
    elif isinstance(update, ReceivedBatch):
        stats.num_batches += 1
        stats.num_events += len(update.events)
        stats.last_event_ts = update.batch.ts
        stats.last_received_at = time.time()
        stats.lag_s = stats.last_received_at - update.batch.ts
        for event in update.events:
            _apply_event(index, pod_id, event, stats, shared)


def _apply_event(
    index: Index,
    pod_id: str,
    event: Event,
    stats: PodStats,
    shared: SharedTierView | None = None,
) -> None:
    try:
        if isinstance(event, (BlockStored, BlockRemoved)) and event.medium == MEDIUM_SHARED:
            if shared is not None:
                update = shared.mark if isinstance(event, BlockStored) else shared.forget
                update(pod_id, event.block_hashes)
        elif isinstance(event, BlockStored):
            index.add(pod_id, event.medium or MEDIUM_GPU, event.block_hashes)
        elif isinstance(event, BlockRemoved):
            index.remove(pod_id, event.medium or MEDIUM_GPU, event.block_hashes)
        elif isinstance(event, AllBlocksCleared):
            index.clear_pod(pod_id)
    except ValueError as exc:  # the index refused the event itself (an unknown medium)
        stats.num_bad_events += 1
        stats.error_log.warning("%s: skipping an event: %s", pod_id, exc)
    except Exception as exc:  # the backend failed (e.g. Redis unreachable): keep going
        stats.num_index_errors += 1
        stats.error_log.warning("%s: the index failed to apply an event: %r", pod_id, exc)
