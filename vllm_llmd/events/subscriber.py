"""Follow one vLLM publisher: live batches in seq order, gaps refilled, restarts reported.

A `Subscriber` owns a SUB socket on one publisher's endpoint and, optionally, a replay client.
`poll(timeout)` returns updates in stream order:

- `ReceivedBatch`: a decoded batch with its source and seq (`replayed` if it came from replay);
- `Reset`: the publisher's seq went back, so its engine restarted and its cache is gone:
  drop everything known about this source before applying what follows;
- `Gap`: seqs that are lost for good (no replay endpoint, or the replay buffer no longer has
  them); the consumer's view of this source may be stale.

Sequence rules, with `next` the seq expected next:

    seq == next            deliver
    seq >  next            replay [next, ...] and deliver what it has, then the live one
    seq <  next            a copy of a batch replay already delivered (same payload): drop;
                           otherwise the engine restarted: Reset, then as from a fresh start

Once its live connection is subscribed, the subscriber asks the replay socket for the whole
buffer, so a consumer that starts after the engine still learns what is cached (asked before,
what is published in between would be missed until the next batch showed the gap); after a
reconnect, it catches up the same way. A restart that happens while the subscriber
is away and already published more batches than before cannot be seen in the seq numbers.

Not thread-safe (ZMQ sockets are not): poll from one thread at a time. Every wait is bounded
by `timeout` (live) or `replay_timeout` (per replayed message).

Transport (`transport=`, see transport.py): "zmq" reads through pyzmq's SUB and DEALER; "zmtp"
through our ZMTP client, which also bounds a multipart message libzmq would buffer without limit
until its last frame. Updates, gaps, replay and reconnects are the same with both; the zmtp one
does its I/O inside `poll()` (it connects and subscribes there, pyzmq in the background).

Bounds (a pod must not cost the router unbounded memory or starve the other pods): each frame
at most `max_message_bytes` (ZMQ_MAXMSGSIZE: libzmq drops the connection of a peer that sends a
bigger one, and the subscriber reconnects), each message at most 3 frames and
`max_message_bytes` in all (zmq: `wire.recv_bounded`, a bigger one is dropped and counted as
malformed; zmtp: the connection is cut before it is buffered, counted in
`num_connections_cut`, and made again after a backoff), each `poll` at most
`max_messages_per_poll` messages and about `max_bytes_per_poll` bytes (the rest waits for the
next poll), each replay bounded as in `replay.py`. A payload that
does not decode (not msgpack, not a batch, nested too deep) costs only itself: it is counted in
`num_malformed_batches`, reported as a one-batch `Gap` (its blocks are unknown, so the view may
be stale), and the poll goes on with the next message.

A replay waits up to `replay_timeout` per message, which a publisher that is gone always costs.
An owner that polls many publishers from one thread passes `defer_replay=True`: then `poll`
never waits on a replay socket. When it needs a replay it stops there (`replay_pending`) and
reads nothing more until the owner calls `complete_replay()` (on another thread, say), which
returns the replay's updates and those of the live batch that called for it, in stream order.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from vllm_llmd.events.curve import CurveClientKeys
from vllm_llmd.events.decoder import MalformedBatchError, decode_batch
from vllm_llmd.events.replay import ReplayClient
from vllm_llmd.events.transport import Transport, check_transport, open_live
from vllm_llmd.events.updates import Gap, ReceivedBatch, Reset, Update
from vllm_llmd.events.wire import (
    DEFAULT_MAX_MESSAGE_BYTES,
    FrameError,
    RawMessage,
    parse_live,
)
from vllm_llmd.log import ThrottledLog

logger = logging.getLogger(__name__)

# A source logs its malformed messages at most this often (each one is counted).
_MALFORMED_LOG_INTERVAL_S = 10.0


@dataclass
class SubscriberStats:
    """Counters for metrics and for `watch`'s summary."""

    num_batches: int = 0
    num_events: int = 0
    num_replayed: int = 0
    num_duplicates: int = 0
    num_resets: int = 0
    num_gaps: int = 0
    num_lost: int = 0  # batches inside gaps
    num_malformed_batches: int = 0
    num_malformed_events: int = 0
    num_unknown_events: int = 0
    num_replay_failures: int = 0
    # connections the zmtp transport cut (a peer over a bound or off the protocol), live and
    # replay; libzmq's drops (zmq transport) are not counted: it does not say why it dropped
    num_connections_cut: int = 0


class Subscriber:
    """SUB client of one publisher endpoint (e.g. "tcp://127.0.0.1:5557")."""

    def __init__(
        self,
        endpoint: str,
        *,
        replay_endpoint: str | None = None,
        topic: str = "",
        source: str | None = None,
        replay_timeout: float = 2.0,
        max_messages_per_poll: int = 1_000,
        max_bytes_per_poll: int = 16 << 20,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        defer_replay: bool = False,
        transport: Transport = "zmq",
        curve: CurveClientKeys | None = None,
    ) -> None:
        for name, value in (("endpoint", endpoint), ("replay_endpoint", replay_endpoint)):
            if value is not None and "*" in value:
                raise ValueError(
                    f"{name} {value!r} is a bind address; a subscriber connects: give the "
                    "publisher's host, e.g. tcp://127.0.0.1:5557 for vLLM's tcp://*:5557"
                )
        check_transport(transport, curve)
        self.endpoint = endpoint
        self.transport = transport
        self.source = source or endpoint
        self.stats = SubscriberStats()
        if min(max_messages_per_poll, max_bytes_per_poll, max_message_bytes) <= 0:
            raise ValueError("the per-poll and per-message bounds must be > 0")
        self.max_messages_per_poll = max_messages_per_poll
        self.max_bytes_per_poll = max_bytes_per_poll
        self.max_message_bytes = max_message_bytes
        self._malformed_log = ThrottledLog(logger, _MALFORMED_LOG_INTERVAL_S)
        self._topic = topic.encode()
        self._cut_lock = threading.Lock()
        self._live = open_live(
            transport,
            endpoint,
            topic=self._topic,
            max_message_bytes=max_message_bytes,
            context=context,
            name=self.source,
            on_cut=self._count_cut,
            curve=curve,
        )
        self._replay = (
            ReplayClient(
                replay_endpoint,
                context=context,
                timeout=replay_timeout,
                max_message_bytes=max_message_bytes,
                transport=transport,
                on_cut=self._count_cut,
                curve=curve,
            )
            if replay_endpoint
            else None
        )
        # seq expected next; None until the first batch (then nothing counts as a gap)
        self._next_seq: int | None = None
        # digests of replayed batches the live stream may still deliver again
        self._replayed: dict[int, bytes] = {}
        # digest of the payload of the last delivered batch (to recognise the publisher)
        self._last_digest = b""
        self._synced = False
        # the live connection was made again: catch up once it is subscribed
        self._resync_needed = False
        self._defer_replay = defer_replay
        # with defer_replay: the replay poll() needs, left for complete_replay()
        self._pending: Callable[[list[Update]], None] | None = None

    def _count_cut(self) -> None:
        # the live socket's poll() and a deferred replay's thread may both count
        with self._cut_lock:
            self.stats.num_connections_cut += 1

    def _reconnect_if_dropped(self, updates: list[Update]) -> None:
        if not self._live.reconnect_if_dropped():
            return
        logger.info(
            "%s: publisher connection dropped (it went away, or sent more than %d bytes); "
            "reconnecting",
            self.source,
            self.max_message_bytes,
        )
        if self._replay is not None and self._next_seq is not None:
            self._resync_needed = True  # once the new connection is subscribed (see poll)

    def _resync(self, updates: list[Update]) -> None:
        """After a dropped connection: the same publisher (catch up) or a restarted one?"""
        assert self._replay is not None and self._next_seq is not None
        last = self._next_seq - 1
        result = self._replay.fetch(max(last, 0))
        first = result.messages[0] if result.messages else None
        if first is not None and first.seq == last and _digest(first.payload) == self._last_digest:
            for message in result.messages[1:]:
                self._deliver(message, updates, replayed=True)
            return
        # The batch we saw last is not in its buffer as we saw it: the engine restarted.
        self._reset(first.seq if first is not None else 0, updates)
        self._catch_up(0, updates)

    @property
    def next_seq(self) -> int | None:
        """The seq expected next from this source; None before the first batch."""
        return self._next_seq

    @property
    def replay_pending(self) -> bool:
        """With defer_replay: poll() needs a replay; it returns nothing until complete_replay()."""
        return self._pending is not None

    def complete_replay(self) -> list[Update]:
        """Run the replay poll() left pending (see module docstring); its updates, in order."""
        updates: list[Update] = []
        pending, self._pending = self._pending, None
        if pending is not None:
            pending(updates)
        return updates

    @property
    def closed(self) -> bool:
        """True once `close()` released the sockets."""
        return self._live.closed

    @property
    def subscribed(self) -> bool:
        """The live connection reached the publisher and its subscription is on its way."""
        return self._live.subscribed

    def poll(self, timeout: float = 0.0) -> list[Update]:
        """Updates that arrive within `timeout` seconds (plus any replay they trigger)."""
        updates: list[Update] = []
        if self._pending is not None:  # deferred: complete_replay() comes first
            # reads nothing, but keeps the live connection going (the zmtp transport connects
            # and subscribes inside poll); complete_replay() does not touch the live socket
            self._live.wait(0.0)
            return updates
        self._reconnect_if_dropped(updates)
        # A replay asked for before the live subscription is in place could miss what is
        # published between the two (and nothing would say so until the next batch): replay
        # once subscribed. pyzmq subscribes in the background; the zmtp transport here.
        if not self._live.subscribed:
            if not self._live.wait(timeout) and not self._live.subscribed:
                return updates  # a message read meanwhile waits its turn, after the replay
        if not self._synced:
            self._synced = True
            if self._replay is not None:
                self._replay_then(lambda pending: self._catch_up(0, pending), updates)
        elif self._resync_needed:
            self._resync_needed = False
            self._replay_then(self._resync, updates)
        if self._pending is not None or not self._live.wait(timeout):
            return updates
        num_bytes = 0
        for _ in range(self.max_messages_per_poll):
            try:
                frames = self._live.recv()
                if frames is None:
                    break
                message = parse_live(frames)
            except FrameError as exc:
                self.stats.num_malformed_batches += 1
                self._warn_malformed("skipping a bad message: %s", exc)
                continue
            self._on_live(message, updates)
            num_bytes += len(message.topic) + len(message.payload)
            if self._pending is not None:  # the rest waits in the socket, behind the replay
                break
            if num_bytes >= self.max_bytes_per_poll:  # the rest waits for the next poll
                break
        return updates

    def _warn_malformed(self, message: str, *args: object) -> None:
        """Log a malformed message, at most every _MALFORMED_LOG_INTERVAL_S per source."""
        self._malformed_log.warning(
            "%s: " + message + " (%d malformed so far)",
            self.source,
            *args,
            self.stats.num_malformed_batches,
        )

    def close(self) -> None:
        """Release the sockets. Idempotent."""
        self._live.close()
        if self._replay is not None:
            self._replay.close()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- sequence tracking --------------------------------------------------------------------

    def _on_live(self, message: RawMessage, updates: list[Update], may_replay: bool = True) -> None:
        if self._next_seq is not None and message.seq < self._next_seq:
            if self._replayed.get(message.seq) == _digest(message.payload):
                self.stats.num_duplicates += 1
                return
            self._reset(message.seq, updates)
        start = self._next_seq or 0
        if may_replay and self._replay is not None and message.seq > start:

            def replay_then_deliver(pending: list[Update]) -> None:
                self._catch_up(start, pending)
                self._on_live(message, pending, may_replay=False)

            self._replay_then(replay_then_deliver, updates)
            return
        self._deliver(message, updates, replayed=False)

    def _replay_then(self, action: Callable[[list[Update]], None], updates: list[Update]) -> None:
        """Run a step that reads the replay socket now, or leave it to complete_replay()."""
        if self._defer_replay:
            self._pending = action
        else:
            action(updates)

    def _catch_up(self, start_seq: int, updates: list[Update]) -> None:
        assert self._replay is not None
        result = self._replay.fetch(start_seq)
        if not result.complete:
            self.stats.num_replay_failures += 1
        for message in result.messages:
            if message.topic and not message.topic.startswith(self._topic):
                continue
            if message.seq < start_seq or (
                self._next_seq is not None and message.seq < self._next_seq
            ):
                continue  # already delivered
            self._deliver(message, updates, replayed=True)

    def _reset(self, seq: int, updates: list[Update]) -> None:
        logger.info("%s: seq went back to %d: the publisher restarted", self.source, seq)
        self.stats.num_resets += 1
        self._next_seq = 0
        self._replayed.clear()
        updates.append(Reset(self.source, seq))

    def _deliver(self, message: RawMessage, updates: list[Update], replayed: bool) -> None:
        seq = message.seq
        if self._next_seq is not None and seq > self._next_seq:
            self.stats.num_gaps += 1
            self.stats.num_lost += seq - self._next_seq
            logger.warning("%s: batches %d..%d are lost", self.source, self._next_seq, seq - 1)
            updates.append(Gap(self.source, self._next_seq, seq - 1))
        self._next_seq = seq + 1
        self._last_digest = _digest(message.payload)
        if replayed:
            self.stats.num_replayed += 1
            self._replayed[seq] = _digest(message.payload)
        elif self._replayed:
            # the live stream is past these: no copy of them can arrive any more
            self._replayed = {s: d for s, d in self._replayed.items() if s > seq}
        try:
            batch = decode_batch(message.payload)
        except Exception as exc:  # MalformedBatchError, or a decoder bug: this batch only
            self.stats.num_malformed_batches += 1
            if isinstance(exc, MalformedBatchError):
                self._warn_malformed("skipping batch %d: %s", seq, exc)
            else:
                logger.exception("%s: decoding batch %d failed; skipped", self.source, seq)
            updates.append(Gap(self.source, seq, seq))
            return
        self.stats.num_batches += 1
        self.stats.num_events += len(batch.events)
        self.stats.num_malformed_events += batch.num_malformed
        self.stats.num_unknown_events += batch.num_unknown
        updates.append(ReceivedBatch(self.source, seq, batch, replayed))


def _digest(payload: bytes) -> bytes:
    return hashlib.blake2b(payload, digest_size=16).digest()
