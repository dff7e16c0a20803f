"""Our ZMTP client (transport="zmtp") against libzmq's sockets and against raw-socket peers.

- it speaks ZMTP as libzmq 4.3 does: a pyzmq XPUB sees its subscription, a ROUTER its requests,
  a 3.0 publisher gets the subscription as a message, PINGs get PONGs;
- what libzmq would buffer without limit is cut at the bound: a publisher that sends 1 MiB frames
  with MORE set and never a last one costs a bounded amount of memory (the zmq transport is run
  on the same publisher to show it does not), and the subscriber reconnects, with backoff, and
  goes on receiving from a good publisher;
- an oversized frame, too many frames, a message too big in all, a malformed greeting, a
  non-NULL mechanism, a wrong socket type, a peer that never finishes its handshake: each cut,
  counted and logged naming the endpoint;
- the replay DEALER: the same bounds against a hostile ROUTER.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator

import msgspec
import pytest
import zmq
from events_harness import poll_until
from events_raw_peers import (
    ZMTP_GREETING_31,
    RawServer,
    command,
    frame,
    handshake,
    message,
    read_frame,
    read_subscription,
    recv_exactly,
)

from vllm_llmd.devtools.server import free_port
from vllm_llmd.events.replay import ReplayClient
from vllm_llmd.events.subscriber import Subscriber
from vllm_llmd.events.updates import ReceivedBatch, Update
from vllm_llmd.events.wire import END_SEQ, encode_seq
from vllm_llmd.events.zmtp import State, ZmtpConnection, parse_tcp_endpoint
from vllm_llmd.events.zmtp_codec import (
    Command,
    FrameDecoder,
    MessageBounds,
    ProtocolError,
    check_greeting,
    encode_message,
    greeting,
)

MiB = 1 << 20


def batch_payload(first_hash: int, num_tokens: int = 16) -> bytes:
    event = ["BlockStored", [first_hash], None, list(range(num_tokens)), 16, None]
    return msgspec.msgpack.encode([time.time(), [event], 0])


def seqs(updates: list[Update]) -> list[int]:
    return [u.seq for u in updates if isinstance(u, ReceivedBatch)]


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


@pytest.fixture
def raw_servers() -> Iterator[Callable[..., RawServer]]:
    servers: list[RawServer] = []

    def start(script) -> RawServer:
        servers.append(RawServer(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()
    for server in servers:
        assert not server.errors, server.errors


@pytest.fixture
def xpub() -> Iterator[tuple[zmq.Socket, str]]:
    sock = zmq.Context.instance().socket(zmq.XPUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.XPUB_VERBOSE, 1)
    sock.bind("tcp://127.0.0.1:*")
    yield sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)
    sock.close(linger=0)


def wait_subscribed(xpub: zmq.Socket, subscriber: Subscriber, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if xpub.poll(20) and xpub.recv().startswith(b"\x01"):
            return
        subscriber.poll(0.0)
    raise TimeoutError("no subscription reached the publisher")


# ---- codec ---------------------------------------------------------------------------------------


def test_greeting_is_what_libzmq_sends_and_checks():
    ours = greeting()
    assert len(ours) == 64 and ours[:10] == b"\xff" + bytes(7) + b"\x01\x7f"
    assert ours[10:12] == b"\x03\x01" and ours[12:32] == b"NULL".ljust(20, b"\0")
    assert check_greeting(ZMTP_GREETING_31) == 1
    assert check_greeting(ZMTP_GREETING_31[:30]) is None  # not all in yet
    assert check_greeting(ZMTP_GREETING_31[:11] + b"\x00" + ZMTP_GREETING_31[12:]) == 0


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"HTTP/1.1 400 Bad Request\r\n", "not a ZMTP peer"),
        (b"\xff" + bytes(8) + b"\x00", "ZMTP 1.0"),
        (b"\xff" + bytes(8) + b"\x7f\x02", "ZMTP 2.x"),
        (ZMTP_GREETING_31[:12] + b"CURVE".ljust(20, b"\0") + bytes(32), "'CURVE'"),
    ],
)
def test_a_malformed_greeting_is_refused_as_early_as_it_shows(data, match):
    with pytest.raises(ProtocolError, match=match):
        check_greeting(data)


def test_decoder_splits_messages_and_commands_across_any_reads():
    stream = (
        encode_message([b"kv", encode_seq(1), b"x" * 300])  # a long frame
        + command(b"PING", b"\x00\x0a" + b"ctx")
        + encode_message([b"kv", encode_seq(2), b"y"])
    )
    decoder = FrameDecoder(MessageBounds(3, 1024))
    items: list = []
    for i in range(len(stream)):  # one byte at a time
        decoder.feed(stream[i : i + 1])
        while (item := decoder.next()) is not None:
            items.append(item)
    assert items == [
        [b"kv", encode_seq(1), b"x" * 300],
        Command(b"PING", b"\x00\x0actx"),
        [b"kv", encode_seq(2), b"y"],
    ]
    assert decoder.buffered_bytes == 0


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (frame(b"x" * 2000), "a frame of 2000 bytes"),
        (b"\x02" + (1 << 62).to_bytes(8, "big"), "a frame of"),  # announced only
        (frame(b"a" * 600, more=True) + frame(b"b" * 600), "more than 1024 bytes"),
        (message(b"1", b"2", b"3", b"4"), "more than 3 frames"),
        (b"\x08\x00", "reserved flag bits"),
        (frame(b"\x05READY", more=True, command=True), "command frame with MORE"),
        (frame(b"a", more=True) + command(b"PING"), "command inside a multipart"),
        (command(b"PING", b"x" * 20_000), "a command of"),
        (frame(b"\x09PI", command=True), "name runs past"),
    ],
)
def test_decoder_refuses_what_breaks_a_bound_before_keeping_it(data, match):
    decoder = FrameDecoder(MessageBounds(3, 1024))
    decoder.feed(data)
    with pytest.raises(ProtocolError, match=match):
        while decoder.next() is not None:
            pass
    assert decoder.buffered_bytes <= len(data)


def test_endpoint_must_be_tcp_host_port():
    assert parse_tcp_endpoint("tcp://[::1]:5557") == ("::1", 5557)
    for bad in ("ipc:///tmp/x", "tcp://host", "tcp://:5557", "tcp://h:0", "tcp://h:x"):
        with pytest.raises(ValueError):
            parse_tcp_endpoint(bad)
    with pytest.raises(ValueError, match="tcp://"):
        Subscriber("ipc:///tmp/kv", transport="zmtp")
    with pytest.raises(ValueError, match="transport"):
        Subscriber("tcp://127.0.0.1:1", transport="nanomsg")


# ---- against libzmq ------------------------------------------------------------------------------


def test_subscribes_to_a_libzmq_publisher_and_filters_the_topic(xpub):
    sock, endpoint = xpub
    with Subscriber(endpoint, topic="kv", transport="zmtp", source="pod-a") as subscriber:
        wait_subscribed(sock, subscriber)
        sock.send_multipart([b"kv", encode_seq(0), batch_payload(1)])
        sock.send_multipart([b"other", encode_seq(7), batch_payload(7)])  # XPUB does not filter
        sock.send_multipart([b"kv", encode_seq(1), batch_payload(2, num_tokens=100_000)])
        updates = poll_until(subscriber, lambda u: 1 in seqs(u))
        assert seqs(updates) == [0, 1]
        assert subscriber.stats.num_connections_cut == 0


def test_polls_while_a_deferred_replay_is_pending_keep_the_live_connection_going(xpub):
    sock, endpoint = xpub
    with Subscriber(
        endpoint,
        replay_endpoint=f"tcp://127.0.0.1:{free_port()}",
        topic="kv",
        transport="zmtp",
        defer_replay=True,
    ) as subscriber:
        # the router's loop: poll() returns nothing until complete_replay(), yet subscribes
        wait_subscribed(sock, subscriber)
        assert subscriber.replay_pending


def test_replay_against_a_libzmq_router():
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("tcp://127.0.0.1:*")
    client = ReplayClient(router.getsockopt_string(zmq.LAST_ENDPOINT), transport="zmtp")
    try:
        for attempt in range(2):  # a complete replay keeps the connection for the next one
            result: dict = {}
            thread = threading.Thread(target=lambda r=result: r.setdefault("r", client.fetch(5)))
            thread.start()
            assert router.poll(5000)
            identity, empty, start = router.recv_multipart()
            assert (empty, start) == (b"", encode_seq(5))
            router.send_multipart([identity, b"", b"kv", encode_seq(5), b"p5"])
            router.send_multipart([identity, b"", encode_seq(6), b"p6"])  # older vLLM
            router.send_multipart([identity, b"", b"", END_SEQ, b""])
            thread.join(10)
            assert result["r"].complete, attempt
            assert [(m.topic, m.seq, m.payload) for m in result["r"].messages] == [
                (b"kv", 5, b"p5"),
                (b"", 6, b"p6"),
            ]
    finally:
        client.close()
        router.close(linger=0)


# ---- raw peers: what libzmq would take -----------------------------------------------------------


def test_a_zmtp_30_publisher_gets_the_subscription_as_a_message(raw_servers):
    seen: list[tuple[int, bytes]] = []

    def publisher_30(conn: socket.socket, stop: threading.Event) -> None:
        handshake(conn, minor=0)
        seen.append(read_subscription(conn))
        conn.sendall(message(b"kv", encode_seq(0), batch_payload(1)))
        stop.wait(5)

    server = raw_servers(publisher_30)
    with Subscriber(server.endpoint, topic="kv", transport="zmtp") as subscriber:
        assert seqs(poll_until(subscriber, lambda u: bool(seqs(u)))) == [0]
    assert seen == [(0, b"\x01kv")]


def test_a_zmtp_31_publisher_gets_a_subscribe_command_and_pings_get_pongs(raw_servers):
    seen: list[tuple[int, bytes]] = []

    def publisher_31(conn: socket.socket, stop: threading.Event) -> None:
        handshake(conn, minor=1)
        seen.append(read_subscription(conn))
        conn.sendall(command(b"PING", b"\x00\x64" + b"ctx-1"))
        seen.append(read_frame(conn))
        conn.sendall(message(b"kv", encode_seq(0), batch_payload(1)))
        stop.wait(5)

    server = raw_servers(publisher_31)
    with Subscriber(server.endpoint, topic="kv", transport="zmtp") as subscriber:
        assert seqs(poll_until(subscriber, lambda u: bool(seqs(u)))) == [0]
    assert seen == [(4, b"\x09SUBSCRIBEkv"), (4, b"\x04PONGctx-1")]


# ---- raw peers: what must be cut -----------------------------------------------------------------


def endless_message(
    frame_bytes: int, limit: int
) -> Callable[[socket.socket, threading.Event], None]:
    """A publisher that, after a valid handshake, sends `frame_bytes` frames with MORE set and
    never a last one, until the client cuts it or `limit` bytes went (then it holds still)."""
    body = frame(b"\0" * frame_bytes, more=True)

    def script(conn: socket.socket, stop: threading.Event) -> None:
        handshake(conn)
        read_subscription(conn)
        conn.sendall(frame(b"kv", more=True))
        sent = 0
        while sent < limit and not stop.is_set():
            conn.sendall(body)
            sent += len(body)
        stop.wait(30)

    return script


@pytest.mark.parametrize(
    "transport",
    [
        "zmtp",
        pytest.param(
            "zmq",
            marks=pytest.mark.xfail(
                strict=True, reason="libzmq buffers an unfinished multipart message without limit"
            ),
        ),
    ],
)
def test_a_message_without_end_is_cut_with_memory_bounded_then_a_good_publisher_is_heard(
    raw_servers, transport, caplog
):
    server = raw_servers(endless_message(MiB, limit=160 * MiB))
    subscriber = Subscriber(server.endpoint, topic="kv", transport=transport, source="pod-endless")
    try:
        before = peak = rss_bytes()
        deadline = time.monotonic() + 8
        with caplog.at_level(logging.WARNING, logger="vllm_llmd.events.zmtp"):
            while time.monotonic() < deadline and server.num_connections < 3:
                if peak - before > 48 * MiB:
                    break  # grown past the bound already (the zmq transport)
                subscriber.poll(0.05)
                peak = max(peak, rss_bytes())
            for _ in range(20):  # the last connection's frames, for the zmq transport
                subscriber.poll(0.05)
                peak = max(peak, rss_bytes())
        # cut at the 4th frame (3 MiB held), three times, with a backoff in between
        assert peak - before < 48 * MiB, f"grew {(peak - before) / MiB:.0f} MiB"
        assert server.num_connections >= 3
        assert subscriber.stats.num_connections_cut >= 2
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("pod-endless" in w and server.endpoint in w for w in warnings), warnings
        assert any("more than 3 frames" in w for w in warnings), warnings

        # the pod comes back well behaved on the same port: heard, after a backoff
        server.close()
        good = zmq.Context.instance().socket(zmq.XPUB)
        good.setsockopt(zmq.LINGER, 0)
        good.bind(server.endpoint)
        try:
            wait_subscribed(good, subscriber)
            good.send_multipart([b"kv", encode_seq(0), batch_payload(1)])
            assert seqs(poll_until(subscriber, lambda u: bool(seqs(u)))) == [0]
        finally:
            good.close(linger=0)
    finally:
        subscriber.close()


def test_bytes_held_stay_under_the_bound_while_a_message_never_ends():
    bounds = MessageBounds(max_frames=1000, max_message_bytes=2 * MiB)
    decoder = FrameDecoder(bounds)
    chunk = frame(b"\0" * (256 << 10), more=True)
    peak = 0
    with pytest.raises(ProtocolError, match="more than 2097152 bytes"):
        for _ in range(1000):  # 250 MiB if nothing stopped it
            decoder.feed(chunk)
            while decoder.next() is not None:
                pass
            peak = max(peak, decoder.buffered_bytes)
    assert 2 * MiB - len(chunk) < peak <= 2 * MiB


def test_a_cut_connection_holds_nothing_and_reports_one_drop(raw_servers):
    server = raw_servers(endless_message(256 << 10, limit=64 * MiB))
    bounds = MessageBounds(max_frames=1000, max_message_bytes=2 * MiB)
    connection = ZmtpConnection(server.endpoint, "SUB", bounds, subscribe=b"kv")
    try:
        deadline = time.monotonic() + 5
        while connection.num_cut == 0 and time.monotonic() < deadline:
            assert connection.recv(0.01) is None
        assert connection.num_cut == 1 and "more than 2097152 bytes" in connection.last_cut_reason
        assert connection.state is State.DOWN and connection.buffered_bytes == 0
        assert connection.take_dropped() and not connection.take_dropped()
    finally:
        connection.close()


def one_bad_connection(bad: bytes, after_handshake: bool = True):
    """First connection: (handshake, subscription, then) `bad`; later ones: a good publisher."""

    def script(conn: socket.socket, stop: threading.Event) -> None:
        if script.calls == 0:  # type: ignore[attr-defined]
            script.calls += 1  # type: ignore[attr-defined]
            if after_handshake:
                handshake(conn)
                read_subscription(conn)
            conn.sendall(bad)
            recv_exactly(conn, 1 << 20)  # until the client cuts the connection
            return
        handshake(conn)
        read_subscription(conn)
        conn.sendall(message(b"kv", encode_seq(0), batch_payload(1)))
        stop.wait(5)

    script.calls = 0  # type: ignore[attr-defined]
    return script


@pytest.mark.parametrize(
    ("bad", "after_handshake", "reason"),
    [
        (frame(b"kv", more=True) + b"\x02" + (2 * MiB).to_bytes(8, "big"), True, "a frame of"),
        (message(b"kv", encode_seq(0), b"p", b"4th"), True, "more than 3 frames"),
        (
            frame(b"kv", more=True)
            + frame(b"s" * (MiB // 2), more=True)
            + frame(b"p" * (MiB // 2 + 10)),
            True,
            "more than 1048576 bytes",
        ),
        (b"GET / HTTP/1.1\r\n\r\n", False, "not a ZMTP peer"),
        (ZMTP_GREETING_31[:12] + b"PLAIN".ljust(20, b"\0") + bytes(32), False, "'PLAIN'"),
        (
            ZMTP_GREETING_31 + command(b"READY", b"\x0bSocket-Type\x00\x00\x00\x03SUB"),
            False,
            "is a SUB",
        ),
        (command(b"ERROR", b"\x06denied"), True, "'denied'"),
        (
            ZMTP_GREETING_31 + command(b"READY", b"\x0bSocket-Type\x00\x00\x00\x09PUB"),
            False,
            "runs past the end",
        ),
    ],
)
def test_a_peer_off_the_protocol_or_over_a_bound_is_cut_counted_and_left_for_a_good_one(
    raw_servers, bad, after_handshake, reason, caplog
):
    server = raw_servers(one_bad_connection(bad, after_handshake))
    with (
        caplog.at_level(logging.WARNING, logger="vllm_llmd.events.zmtp"),
        Subscriber(
            server.endpoint, topic="kv", transport="zmtp", source="pod-bad", max_message_bytes=MiB
        ) as subscriber,
    ):
        updates = poll_until(subscriber, lambda u: bool(seqs(u)))
        assert seqs(updates) == [0]
        assert subscriber.stats.num_connections_cut == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("pod-bad" in w and server.endpoint in w and reason in w for w in warnings), warnings


def test_a_peer_that_never_finishes_its_handshake_is_cut(raw_servers):
    def silent(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(ZMTP_GREETING_31[:20])
        stop.wait(10)

    server = raw_servers(silent)
    bounds = MessageBounds(3, MiB)
    connection = ZmtpConnection(
        server.endpoint, "SUB", bounds, subscribe=b"", handshake_timeout=0.3
    )
    try:
        started = time.monotonic()
        while connection.num_cut == 0 and time.monotonic() - started < 5:
            connection.recv(0.05)
        assert connection.num_cut == 1 and "no handshake within" in connection.last_cut_reason
        assert not connection.take_dropped()  # it never was up: not a drop to resync after
    finally:
        connection.close()


def test_a_replay_router_that_never_ends_a_message_is_cut(raw_servers):
    def hostile_router(conn: socket.socket, stop: threading.Event) -> None:
        handshake(conn, socket_type=b"ROUTER")
        assert read_frame(conn) == (1, b"")  # the request: [b"", start seq]
        assert read_frame(conn) == (0, encode_seq(0))
        body = frame(b"\0" * MiB, more=True)
        while not stop.is_set():
            conn.sendall(body)

    server = raw_servers(hostile_router)
    cuts: list[int] = []
    client = ReplayClient(
        server.endpoint, transport="zmtp", timeout=2.0, on_cut=lambda: cuts.append(1)
    )
    try:
        before = rss_bytes()
        result = client.fetch(0)
        assert not result.complete and result.messages == []
        assert cuts == [1]
        assert rss_bytes() - before < 32 * MiB
    finally:
        client.close()


def test_reconnects_back_off_while_a_peer_keeps_breaking_the_protocol(raw_servers):
    def garbage(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(b"not zmtp")
        recv_exactly(conn, 1 << 20)  # until the client cuts the connection

    server = raw_servers(garbage)
    connection = ZmtpConnection(server.endpoint, "SUB", MessageBounds(3, MiB), subscribe=b"")
    try:
        started = time.monotonic()
        while time.monotonic() - started < 1.6:
            connection.recv(0.05)
        # cut at once each time, retried after 0.2, 0.4, 0.8 s: libzmq's fixed 0.1 s would be 16
        assert 3 <= connection.num_cut <= 5, connection.num_cut
        assert connection.num_cut <= server.num_connections <= connection.num_cut + 1
    finally:
        connection.close()
