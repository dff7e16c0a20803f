"""The index's write path: each pod's KV-event stream, applied to an `Index`.

    Subscriber (transport: ZMQ, seq order, replay)  ->  Update (events/decoder: parsed)
        -> apply_update (this module: events to index operations)  ->  Index (domain, state)

`EventIngestor(index)` runs one thread that polls every pod's `Subscriber` in turn and applies
what arrives with `event_apply.apply_update` (which says what each event does to the index); a
gap is also passed to `on_gap(pod)` when set (the router's event-gap counter). A failing
subscriber is never fatal to the thread: a poll that raises is counted, logged with the pod and
its traceback, and the pod is polled again after a backoff (doubling up to `_MAX_BACKOFF_S`)
while the others go on.

The index can lose entries behind the ingestor's back: a Redis that restarted empty (its epoch
key changed), or failed to apply some events. The polling thread asks it every `index_check_s`
and, once it answers, rebuilds each affected pod that has a replay endpoint: its entries are
cleared and its publisher's buffer replayed from the start (`num_resyncs`).

Replays (a subscriber's first sync, a gap, a reconnect) wait on the pod's replay socket, up to
2 s per message when its publisher is gone; they run on a thread of their own per pod (at most
one at a time), so a dead pod never holds up the others' events.

Calls from the owner (any thread): `add_pod`, `remove_pod`, `stats`, `live_pods`, `close`.
`add_pod` clears the pod's entries first: its subscriber replays the publisher's buffer from seq
0, which would otherwise count blocks a previous ingestor (a shared Redis index) already
counted. So each pod must have one ingestor per index.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from vllm_llmd.events.curve import CurveClientKeys
from vllm_llmd.events.subscriber import Subscriber
from vllm_llmd.events.transport import Transport, check_transport
from vllm_llmd.events.updates import Gap, Update
from vllm_llmd.log import ThrottledLog
from vllm_llmd.router.event_apply import ERROR_LOG_INTERVAL_S, PodStats, apply_update
from vllm_llmd.router.index import Index
from vllm_llmd.router.shared_view import SharedTierView

logger = logging.getLogger(__name__)

# A pod whose poll failed waits this long before the next, doubling per failure up to the max.
_FIRST_BACKOFF_S = 0.1
_MAX_BACKOFF_S = 5.0


@dataclass(frozen=True)
class _Source:
    """Where a pod's events come from (`EventIngestor.add_pod`'s arguments)."""

    endpoint: str
    replay_endpoint: str | None
    topic: str


class _Pod:
    """One followed pod. `lock` serialises its subscriber: ZMQ sockets are not thread-safe."""

    def __init__(self, pod_id: str, source: _Source, subscriber: Subscriber) -> None:
        self.pod_id = pod_id
        self.source = source
        self.subscriber = subscriber
        self.stats = PodStats()
        # the index lost some of this pod's events: rebuild its entries from the replay buffer
        self.needs_resync = False
        # stats.num_index_errors when the entries were last (re)built
        self.synced_errors = 0
        self.lock = threading.Lock()
        self.removed = False
        # a replay thread has the subscriber: the polling thread skips the pod, never waits
        self.replaying = False
        # after a failed poll: not polled before retry_at (time.monotonic()); backoff_s doubles
        self.retry_at = 0.0
        self.backoff_s = 0.0

    def failed(self) -> float:
        """A poll failed: back off (doubling). The seconds until the next try."""
        self.backoff_s = min(_MAX_BACKOFF_S, max(_FIRST_BACKOFF_S, 2 * self.backoff_s))
        self.retry_at = time.monotonic() + self.backoff_s
        return self.backoff_s


class EventIngestor:
    """Follows pods' KV-event streams on one thread and applies them to `index`.

    The thread polls each pod without waiting; when a whole round brought nothing, it sleeps
    `idle_wait_s`, which bounds both the added latency and the idle cost (pods x 1/idle_wait_s
    non-blocking polls a second).
    """

    def __init__(
        self,
        index: Index,
        *,
        shared: SharedTierView | None = None,
        idle_wait_s: float = 0.01,
        transport: Transport = "zmq",
        curve: CurveClientKeys | None = None,
        index_check_s: float = 1.0,
    ) -> None:
        self.index = index
        self.shared = shared
        check_transport(transport, curve)
        # how each pod's event sockets are spoken: pyzmq, or our bounded ZMTP client
        self.transport: Transport = transport
        # the router's CURVE keys and the pods' public key (events/curve.py); None: in clear
        self.curve = curve
        # how often the index is asked whether it lost content (`_check_index`)
        self.index_check_s = index_check_s
        self._epoch: str | None = None  # the index's epoch as last seen
        self._index_log = ThrottledLog(logger, ERROR_LOG_INTERVAL_S)
        self.idle_wait_s = idle_wait_s
        # called on the polling (or a replay) thread with the pod's id for each gap seen
        self.on_gap: Callable[[str], None] | None = None
        self._pods: dict[str, _Pod] = {}
        self._pods_lock = threading.Lock()  # guards _pods only; never held while polling
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-event-ingest", daemon=True)
        self._thread.start()

    def add_pod(
        self,
        pod_id: str,
        endpoint: str,
        replay_endpoint: str | None = None,
        topic: str = "",
    ) -> None:
        """Follow a pod's publisher from the start of its replay buffer (see module docstring).

        Args:
            pod_id: the name the index and the scorer use for this pod.
            endpoint: the publisher's address to connect to, e.g. "tcp://10.0.0.5:5557".
            replay_endpoint: its replay socket; None: no history, lost batches become gaps.
            topic: the publisher's topic (vLLM's `kv_events_config.topic`).
        """
        if self._stop.is_set():
            raise RuntimeError("EventIngestor is closed")
        with self._pods_lock:
            if pod_id in self._pods:
                raise ValueError(f"pod {pod_id!r} is already followed; remove_pod it first")
        # Built here so a bad endpoint raises to the caller; the lock hands the sockets over
        # to the polling thread (ZMQ allows moving a socket across a full memory barrier).
        source = _Source(endpoint, replay_endpoint, topic)
        subscriber = self._subscribe(pod_id, source)
        try:
            self.index.clear_pod(pod_id)
        except BaseException:  # the index is down (IndexUnavailable): the caller tries again
            subscriber.close()
            raise
        with self._pods_lock:
            if pod_id in self._pods:  # added concurrently
                subscriber.close()
                raise ValueError(f"pod {pod_id!r} is already followed; remove_pod it first")
            self._pods[pod_id] = _Pod(pod_id, source, subscriber)

    def _subscribe(self, pod_id: str, source: _Source) -> Subscriber:
        """A subscriber that replays the pod's buffer from its start once polled."""
        return Subscriber(
            source.endpoint,
            replay_endpoint=source.replay_endpoint,
            topic=source.topic,
            source=pod_id,
            defer_replay=True,
            transport=self.transport,
            curve=self.curve,
        )

    def remove_pod(self, pod_id: str) -> None:
        """Stop following a pod and forget its entries. Unknown pods are a no-op."""
        with self._pods_lock:
            pod = self._pods.pop(pod_id, None)
        if pod is None:
            return
        with pod.lock:  # waits for a poll in flight
            pod.removed = True
            pod.subscriber.close()
        try:
            self.index.clear_pod(pod_id)
            if self.shared is not None:
                self.shared.remove_member(pod_id)
        except Exception as exc:  # Redis down: its entries stay until they expire (TTL)
            logger.warning("%s: its index entries could not be dropped: %r", pod_id, exc)

    def pods(self) -> list[str]:
        """The pods followed now."""
        with self._pods_lock:
            return list(self._pods)

    def stats(self) -> dict[str, dict[str, float | int | None]]:
        """{pod: counters}: PodStats, plus the subscriber's `num_malformed` (batches and events
        it could not decode), `num_unknown_events` (types it does not know) and
        `num_replay_failures` (replays that did not complete) and `num_connections_cut`
        (event connections cut for a frame or message past its bounds). A snapshot, read without
        stopping the thread."""
        with self._pods_lock:
            pods = list(self._pods.values())
        result = {}
        for pod in pods:
            sub = pod.subscriber.stats
            counters = pod.stats.as_dict()
            counters["num_malformed"] = sub.num_malformed_batches + sub.num_malformed_events
            counters["num_unknown_events"] = sub.num_unknown_events
            counters["num_replay_failures"] = sub.num_replay_failures
            counters["num_connections_cut"] = sub.num_connections_cut
            result[pod.pod_id] = counters
        return result

    def live_pods(self) -> set[str]:
        """The followed pods whose stream is live: it has delivered at least one batch (live or
        replayed) since the pod was added, and its last poll did not fail."""
        with self._pods_lock:
            pods = list(self._pods.values())
        return {
            pod.pod_id
            for pod in pods
            if pod.stats.num_batches > 0 and pod.backoff_s == 0.0 and not pod.removed
        }

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread and the subscribers. Index entries stay (others may share them)."""
        self._stop.set()
        self._thread.join(timeout)
        with self._pods_lock:
            pods, self._pods = list(self._pods.values()), {}
        for pod in pods:
            with pod.lock:
                pod.removed = True
                pod.subscriber.close()

    def __enter__(self) -> EventIngestor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- the polling thread --------------------------------------------------------------

    def _run(self) -> None:
        next_index_check = 0.0
        while not self._stop.is_set():
            if time.monotonic() >= next_index_check:
                next_index_check = time.monotonic() + self.index_check_s
                self._check_index()
            with self._pods_lock:
                pods = list(self._pods.values())
            busy = False
            for pod in pods:
                try:
                    busy |= self._poll(pod)
                except Exception:  # a bug here must not stop every pod's events
                    pod.stats.num_poll_errors += 1
                    logger.exception(
                        "%s: polling its events failed; next try in %.1f s",
                        pod.pod_id,
                        pod.failed(),
                    )
            if not busy:
                self._stop.wait(self.idle_wait_s)

    def _check_index(self) -> None:
        """Rebuild the entries the index lost: every pod's when its content went (its epoch
        changed), a pod's when applying its events failed; once the index answers again."""
        try:
            epoch = self.index.epoch()
        except Exception as exc:  # down: its pods are rebuilt once it answers
            self._index_log.warning("the index does not answer (%r); retrying", exc)
            return
        lost = self._epoch is not None and epoch != self._epoch
        if lost:
            logger.warning("the index lost its content: replaying every pod's events into it")
        self._epoch = epoch
        with self._pods_lock:
            pods = list(self._pods.values())
        for pod in pods:
            if pod.source.replay_endpoint is None:  # nothing to rebuild from: clearing
                continue  # would lose what the index still holds
            pod.needs_resync |= lost or pod.stats.num_index_errors > pod.synced_errors
            if pod.needs_resync and not pod.replaying:
                self._resync(pod)

    def _resync(self, pod: _Pod) -> None:
        """Rebuild a pod's entries: clear them, and replay its publisher's buffer from the
        start through a new subscriber (the polling loop runs the replay)."""
        with pod.lock:
            if pod.removed:
                return
            errors = pod.stats.num_index_errors
            try:
                self.index.clear_pod(pod.pod_id)
                subscriber = self._subscribe(pod.pod_id, pod.source)
            except Exception as exc:  # tried again at the next check
                self._index_log.warning("%s: cannot rebuild its entries yet: %r", pod.pod_id, exc)
                return
            pod.subscriber.close()
            pod.subscriber = subscriber
            pod.needs_resync, pod.synced_errors = False, errors
            pod.stats.num_resyncs += 1
        logger.info("%s: rebuilding its index entries from its replay buffer", pod.pod_id)

    def _poll(self, pod: _Pod) -> bool:
        """Poll one pod once and apply what came; True if anything came."""
        if pod.replaying or time.monotonic() < pod.retry_at:
            return False
        with pod.lock:
            if pod.removed:
                return False
            updates = self._read(pod, pod.subscriber.poll, 0.0)
            if pod.subscriber.replay_pending:
                pod.replaying = True
                name = f"kv-event-replay-{pod.pod_id}"
                threading.Thread(target=self._replay, args=(pod,), name=name, daemon=True).start()
            return bool(updates)

    def _replay(self, pod: _Pod) -> None:
        """A replay thread: the replay the pod's subscriber left pending, applied in order."""
        with pod.lock:
            try:
                if not pod.removed:
                    self._read(pod, pod.subscriber.complete_replay)
            except Exception:  # never a silent death: the pod is polled again after a backoff
                pod.stats.num_poll_errors += 1
                logger.exception(
                    "%s: its replay failed; next poll in %.1f s", pod.pod_id, pod.failed()
                )
            finally:
                pod.replaying = False

    def _read(self, pod: _Pod, read: Callable[..., list[Update]], *args: float) -> list[Update]:
        """Apply what one subscriber call brings (under pod.lock); its failures are counted."""
        try:
            updates = read(*args)
        except Exception as exc:  # a transport bug must not stop the other pods
            pod.stats.num_poll_errors += 1
            pod.stats.error_log.warning(
                "%s: polling its event stream failed (%r); next try in %.1f s",
                pod.pod_id,
                exc,
                pod.failed(),
                exc_info=True,
            )
            return []
        pod.backoff_s = 0.0
        for update in updates:
            apply_update(self.index, pod.pod_id, update, pod.stats, self.shared)
            if isinstance(update, Gap) and self.on_gap is not None:
                try:
                    self.on_gap(pod.pod_id)
                except Exception:  # a metrics hook must never stop the pod's events
                    logger.exception("%s: the gap hook failed", pod.pod_id)
        return updates
