"""What a pod's KV-event publisher can send the router, bounded: real ZMQ sockets play a
misbehaving publisher (an XPUB, which tells the test when the subscription arrived) and a
misbehaving replay ROUTER.

- a payload that does not decode (msgpack nested past msgspec's depth guard) costs only itself:
  the poll keeps the good batches around it, the bad one is a one-batch Gap, seq tracking goes on;
- a frame over the size bound never reaches Python (libzmq drops the peer; we reconnect), a
  message whose frames are each small but too big together is dropped and counted, naming the pod;
- one poll reads a bounded number of messages and bytes; one replay a bounded number of batches
  and bytes.

Each runs with both transports ("zmq": pyzmq; "zmtp": our bounded ZMTP client) where both
behave alike. libzmq buffers a multipart message until its last frame, so a publisher that never
sends one grows a "zmq" subscriber without limit: test_events_zmtp.py shows that, and the "zmtp"
transport cutting it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import msgspec
import pytest
import zmq
from events_harness import poll_until

from vllm_llmd.events.decoder import MalformedBatchError, decode_batch
from vllm_llmd.events.replay import ReplayClient
from vllm_llmd.events.subscriber import Subscriber
from vllm_llmd.events.transport import TRANSPORTS
from vllm_llmd.events.updates import Gap, ReceivedBatch, Update
from vllm_llmd.events.wire import END_SEQ, encode_seq

# msgpack: a fixarray of one element, nested far past msgspec's recursion guard
DEEP_PAYLOAD = b"\x91" * 200_000 + b"\xc0"


def batch_payload(first_hash: int, num_tokens: int = 16) -> bytes:
    """A valid KVEventBatch (the array form) whose BlockStored carries num_tokens token ids."""
    event = ["BlockStored", [first_hash], None, list(range(num_tokens)), 16, None]
    return msgspec.msgpack.encode([time.time(), [event], 0])


@pytest.fixture(params=TRANSPORTS)
def transport(request) -> str:
    return request.param


@pytest.fixture
def xpub() -> Iterator[tuple[zmq.Socket, str]]:
    """A publisher socket on a free port that also receives its subscribers' subscriptions."""
    socket = zmq.Context.instance().socket(zmq.XPUB)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscription, also a repeated one
    socket.bind("tcp://127.0.0.1:*")
    yield socket, socket.getsockopt_string(zmq.LAST_ENDPOINT)
    socket.close(linger=0)


def wait_subscribed(
    xpub: zmq.Socket, subscriber: Subscriber | None = None, timeout: float = 10.0
) -> list[Update]:
    """Until a subscription reaches the publisher (polling `subscriber`, so it may reconnect)."""
    updates: list[Update] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if xpub.poll(50) and xpub.recv().startswith(b"\x01"):
            return updates
        if subscriber is not None:
            updates += subscriber.poll(0.0)
    raise TimeoutError("no subscription reached the publisher")


def seqs(updates: list[Update]) -> list[int]:
    return [u.seq for u in updates if isinstance(u, ReceivedBatch)]


# ---- a payload that does not decode ------------------------------------------------------------


def test_deep_nesting_is_a_malformed_batch_not_a_recursion_error():
    with pytest.raises(MalformedBatchError, match="nested too deeply"):
        decode_batch(DEEP_PAYLOAD)
    events = b"\x93\xcb" + msgspec.msgpack.encode(1.5)[1:] + DEEP_PAYLOAD + b"\x00"
    with pytest.raises(MalformedBatchError):
        decode_batch(events)


def test_a_deeply_nested_batch_between_good_ones_costs_only_itself(xpub, transport):
    socket, endpoint = xpub
    with Subscriber(endpoint, source="pod-deep", transport=transport) as subscriber:
        wait_subscribed(socket, subscriber)
        for seq, payload in enumerate([batch_payload(10), DEEP_PAYLOAD, batch_payload(12)]):
            socket.send_multipart([b"kv", encode_seq(seq), payload])
        time.sleep(0.3)  # all three wait in the SUB socket: one poll reads them together
        updates = subscriber.poll(1.0)
        assert seqs(updates) == [0, 2]
        assert [u for u in updates if isinstance(u, Gap)] == [Gap("pod-deep", 1, 1)]
        assert subscriber.stats.num_malformed_batches == 1
        assert subscriber.next_seq == 3

        # the stream goes on in order: the next batch is no gap and no restart
        socket.send_multipart([b"kv", encode_seq(3), batch_payload(13)])
        later = poll_until(subscriber, lambda u: bool(seqs(u)))
        assert seqs(later) == [3] and not [u for u in later if not isinstance(u, ReceivedBatch)]


# ---- size bounds on live messages ---------------------------------------------------------------


def test_a_frame_over_the_bound_never_arrives_and_the_subscriber_reconnects(xpub, transport):
    socket, endpoint = xpub
    bound = 64 << 10
    with Subscriber(
        endpoint, source="pod-big", max_message_bytes=bound, transport=transport
    ) as subscriber:
        wait_subscribed(socket, subscriber)
        socket.send_multipart([b"kv", encode_seq(0), batch_payload(1, num_tokens=40_000)])
        # libzmq drops the connection at the oversized frame; the subscriber's next polls see
        # that and connect a new socket, whose subscription reaches the publisher again
        updates = wait_subscribed(socket, subscriber)
        socket.send_multipart([b"kv", encode_seq(1), batch_payload(2)])
        updates += poll_until(subscriber, lambda u: bool(seqs(u)))
        assert seqs(updates) == [1]
        assert subscriber.stats.num_connections_cut == (transport == "zmtp")


def test_a_message_too_big_in_all_is_dropped_and_counted_naming_the_pod(xpub, caplog):
    # zmq only: the zmtp transport cuts the connection instead (test_events_zmtp.py)
    socket, endpoint = xpub
    limit = 64 << 10
    with Subscriber(endpoint, source="pod-wide", max_message_bytes=limit) as subscriber:
        wait_subscribed(socket, subscriber)
        payload = batch_payload(1, num_tokens=12_000)  # about 36 KiB: under the bound alone
        assert len(payload) < limit < 2 * len(payload)
        with caplog.at_level(logging.WARNING, logger="vllm_llmd.events.subscriber"):
            socket.send_multipart([b"k" * len(payload), encode_seq(0), payload])
            socket.send_multipart([b"kv", encode_seq(1), *[b"x"] * 20])  # too many frames
            socket.send_multipart([b"kv", encode_seq(2), batch_payload(2)])
            updates = poll_until(subscriber, lambda u: bool(seqs(u)))
        assert seqs(updates) == [2]
        assert subscriber.stats.num_malformed_batches == 2
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("pod-wide" in w and "bytes" in w for w in warnings), warnings


def test_one_poll_reads_a_bounded_number_of_messages_and_bytes(xpub, transport):
    socket, endpoint = xpub
    payload = batch_payload(1, num_tokens=3_000)  # about 9 KiB
    bounds = {"max_messages_per_poll": 4, "max_bytes_per_poll": 2 * len(payload) + 1}
    with Subscriber(endpoint, source="pod-flood", transport=transport, **bounds) as subscriber:
        wait_subscribed(socket, subscriber)
        for seq in range(10):
            socket.send_multipart([b"", encode_seq(seq), payload])
        time.sleep(0.3)
        assert seqs(subscriber.poll(1.0)) == [0, 1, 2]  # the third crossed the byte budget
        subscriber.max_bytes_per_poll = 1 << 30
        assert seqs(subscriber.poll(1.0)) == [3, 4, 5, 6]  # the message budget
        assert seqs(subscriber.poll(1.0)) == [7, 8, 9]


# ---- size bounds on a replay ---------------------------------------------------------------------


def router_socket() -> tuple[zmq.Socket, str]:
    """A ROUTER on a free port, playing a publisher's replay socket."""
    socket = zmq.Context.instance().socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.bind("tcp://127.0.0.1:*")
    return socket, socket.getsockopt_string(zmq.LAST_ENDPOINT)


def fetch_with_server(socket: zmq.Socket, replies: list[list[bytes]], client: ReplayClient):
    """client.fetch(0) on a thread, answered with `replies` by the ROUTER `socket` here."""
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("r", client.fetch(0)))
    thread.start()
    assert socket.poll(5000), "no replay request"
    identity, *_ = socket.recv_multipart()
    for reply in replies:
        socket.send_multipart([identity, *reply])
    thread.join(10)
    return result["r"]


def replay_reply(seq: int, payload: bytes) -> list[bytes]:
    return [b"", b"kv", encode_seq(seq), payload]


END = [b"", b"", END_SEQ, b""]


REPLAYED = batch_payload(1, num_tokens=3_000)  # about 9 KiB


@pytest.mark.parametrize(
    ("bounds", "num_kept"),
    [
        ({"max_messages": 3}, 3),
        ({"max_bytes": len(REPLAYED) * 3 // 2}, 1),
        ({"max_message_bytes": len(REPLAYED) // 2}, 0),  # the peer is dropped: a timeout
    ],
)
def test_a_replay_brings_a_bounded_number_of_batches_and_bytes(bounds, num_kept, transport):
    socket, endpoint = router_socket()
    payload = REPLAYED
    replies = [replay_reply(seq, payload) for seq in range(10)] + [END]
    client = ReplayClient(endpoint, timeout=0.5, transport=transport, **bounds)
    try:
        result = fetch_with_server(socket, replies, client)
        assert not result.complete
        assert [m.seq for m in result.messages] == list(range(num_kept))
        # without the bounds the same reply is complete
        unbounded = ReplayClient(endpoint, timeout=0.5, transport=transport)
        try:
            full = fetch_with_server(socket, replies, unbounded)
        finally:
            unbounded.close()
        assert full.complete and len(full.messages) == 10
    finally:
        client.close()
        socket.close(linger=0)


def test_a_replay_message_with_too_many_frames_ends_the_replay(transport):
    socket, endpoint = router_socket()
    replies = [replay_reply(0, batch_payload(1)), [b"", b"kv", *[b"x"] * 30], END]
    client = ReplayClient(endpoint, timeout=0.5, transport=transport)
    try:
        result = fetch_with_server(socket, replies, client)
        assert [m.seq for m in result.messages] == [0] and not result.complete
    finally:
        client.close()
        socket.close(linger=0)


@pytest.mark.parametrize(
    "name", ["max_messages_per_poll", "max_bytes_per_poll", "max_message_bytes"]
)
def test_bounds_must_be_positive(name, transport):
    with pytest.raises(ValueError, match="must be > 0"):
        Subscriber("tcp://127.0.0.1:1", transport=transport, **{name: 0})
