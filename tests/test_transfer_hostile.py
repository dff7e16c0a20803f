"""The P/D side channel against peers that do not play by the rules (issue 23).

Real sockets throughout: a raw TCP peer, a ZMQ peer in another process, and a tiny raw-TCP
"prefill" that answers what a hostile one would. What each test proves: the server holds only
what the framing bounds and keeps serving; a read names each block once and fits the server's
max_chunk_bytes; an unauthenticated peer learns nothing about a layout; the client's every
retry is bounded and a failed pull is released as failed; a failure of the serving loop is
logged and answered at once.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import textwrap
import threading
import time

import msgspec
import pytest
import torch
from test_transfer import FINGERPRINT, NUM_LAYERS, PAGE, _byte_cache_server, _pull

from vllm_llmd.transfer import messages as wire
from vllm_llmd.transfer.client import PullSpec, TransferFailed, pull_blocks
from vllm_llmd.transfer.framing import HEADER, MAGIC, frame, frame_header, recv_exactly
from vllm_llmd.transfer.registry import SendOutcome, SendRegistry, SendState

BLOCK_BYTES = NUM_LAYERS * PAGE


@pytest.fixture
def side_channel():
    """A prefill that never offers shared memory: every byte goes through the socket."""
    server, registry, cache, gathers = _byte_cache_server(same_host_shm=False)
    try:
        yield server, registry, cache, gathers
    finally:
        server.close()


def _assert_still_serves(server, registry, cache, transfer_id="after") -> None:
    registry.add("req-" + transfer_id, transfer_id, [2, 5])
    _, data = _pull(server, transfer_id, [2, 5])
    assert torch.equal(data, cache[torch.tensor([2, 5])])


def _answer(sock: socket.socket) -> wire.Reply | None:
    """The server's reply frame on a raw connection, or None if it closed without one."""
    deadline = time.monotonic() + 3
    try:
        header = recv_exactly(sock, HEADER.size, deadline)
    except ConnectionError:
        return None
    _, _, control_bytes, _ = HEADER.unpack(header)
    return wire.decode_reply(recv_exactly(sock, control_bytes, deadline))


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(3)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# ---- 1. whole-message bounds -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "refusal"),
    [
        (frame_header(wire.MAX_CONTROL_BYTES + 1), "control part of 1048577 bytes exceeds"),
        (frame_header(10, 1 << 40), "data part of 1099511627776 bytes exceeds the 0 allowed"),
        (HEADER.pack(MAGIC, 3, 10, 0), "peer speaks LLMD transfer protocol v3, this side v2"),
        (b"\xff" + bytes(8) + b"\x7f" + bytes(8), "the peer speaks ZMQ"),
    ],
    ids=["control-too-large", "data-in-request", "other-version", "zmq-v1-peer"],
)
def test_a_bad_frame_header_is_refused_before_its_body(side_channel, header, refusal):
    server, registry, cache, _ = side_channel
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(header)
        reply = _answer(sock)
        assert isinstance(reply, wire.TransferError) and reply.code == wire.BAD_REQUEST
        assert refusal in reply.message
        assert _closed_by_peer(sock)
    assert server.connections.max_buffered_seen <= HEADER.size
    _assert_still_serves(server, registry, cache)


def test_an_endless_stream_is_cut_off_and_held_bytes_stay_bounded(side_channel):
    """A valid header, then bytes without end: the server reads the one frame it announced
    (undecodable: answered), then a next header that is garbage: disconnected."""
    server, registry, cache, _ = side_channel
    sent, chunk = 0, bytes(1 << 20)
    rss_before = _rss_bytes()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(3)
        sock.sendall(frame_header(wire.MAX_CONTROL_BYTES))
        with pytest.raises((ConnectionError, TimeoutError)):
            while sent < 512 << 20:
                sock.sendall(chunk)
                sent += len(chunk)
    assert sent < 64 << 20  # cut off after the first frame and what the kernel buffers
    assert server.connections.max_buffered_seen <= HEADER.size + wire.MAX_CONTROL_BYTES
    assert server.connections.buffered_bytes == 0
    assert _rss_bytes() - rss_before < 48 << 20
    _assert_still_serves(server, registry, cache)


def test_partial_requests_are_bounded_in_time_and_in_total(side_channel):
    server, registry, cache, _ = side_channel
    server.connections.max_buffered_bytes = 2 << 20
    half = frame_header(wire.MAX_CONTROL_BYTES) + bytes(900 << 10)
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
    try:
        for count, sock in enumerate(socks[:2], start=1):
            sock.sendall(half)  # a request never finished
            deadline = time.monotonic() + 3
            while server.connections.buffered_bytes < count * len(half):
                assert time.monotonic() < deadline, server.connections.buffered_bytes
                time.sleep(0.01)
        socks[2].sendall(half)
        assert _closed_by_peer(socks[2])  # over the total: closed at once
        assert server.connections.max_buffered_seen <= 2 << 20
        server.connections.request_timeout_s = 0.3
        assert all(_closed_by_peer(sock) for sock in socks[:2])  # too slow: closed
        assert server.connections.buffered_bytes == 0
    finally:
        for sock in socks:
            sock.close()
    _assert_still_serves(server, registry, cache)


# A raw ZMTP 3.0 peer (what a ZMQ DEALER sends, by hand: libzmq itself sends a multipart
# message only once its last frame is queued): greeting, READY, then 1 MiB frames with MORE.
_ZMTP_ATTACKER = textwrap.dedent(
    """
    import socket, struct, sys, time
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    sock = socket.create_connection((host, port))
    greeting = b"\\xff" + bytes(8) + b"\\x7f" + b"\\x03\\x00" + b"NULL".ljust(20, b"\\0")
    greeting += bytes(32)
    ready = b"\\x05READY\\x0bSocket-Type" + struct.pack("!I", 6) + b"DEALER"
    part = bytes(1 << 20)
    sent = 0
    try:
        sock.sendall(greeting + bytes([0x04, len(ready)]) + ready)
        for _ in range(count):
            sock.sendall(b"\\x03" + struct.pack("!Q", len(part)) + part)  # MORE | LONG
            sent += 1
    except OSError:
        pass
    print(sent, flush=True)
    time.sleep(60)
    """
)


def test_a_multipart_message_without_end_does_not_grow_the_server(side_channel):
    """The reproduction of issue 23: 1 MB frames with MORE set and no last frame grew the
    ZMQ ROUTER's process without bound (libzmq buffers a multipart message whole)."""
    server, registry, cache, _ = side_channel
    count = 192
    rss_before = _rss_bytes()
    attacker = subprocess.Popen(
        [sys.executable, "-c", _ZMTP_ATTACKER, "127.0.0.1", str(server.port), str(count)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        sent = int(attacker.stdout.readline())
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and _rss_bytes() - rss_before < 64 << 20:
            time.sleep(0.1)
        assert _rss_bytes() - rss_before < 64 << 20
        assert sent < count  # cut off
        _assert_still_serves(server, registry, cache)
    finally:
        attacker.kill()
        attacker.wait()


# ---- 2. block ids: unique, within the server's max_chunk_bytes -----------------------------------


def test_a_read_naming_a_block_twice_is_refused_and_nothing_is_gathered(side_channel):
    server, registry, _, gathers = side_channel
    registry.add("req", "tid", [3, 4])
    with pytest.raises(TransferFailed, match="more than once"):
        _pull(server, "tid", [3, 3])
    assert gathers == []
    [send] = registry.take_finished()  # the puller released it as failed
    assert send.outcome == SendOutcome.FAILED


def test_a_read_over_the_servers_max_chunk_bytes_is_refused_unpinned():
    server, registry, cache, gathers = _byte_cache_server(
        same_host_shm=False, max_chunk_bytes=2 * BLOCK_BYTES
    )
    try:
        registry.add("req", "tid", list(range(8)))
        with pytest.raises(TransferFailed, match=r"too_large.*max_chunk_bytes \(576\)"):
            _pull(server, "tid", [0, 1, 2], read_bytes=3 * BLOCK_BYTES)
        assert gathers == []
        [send] = registry.take_finished()  # not left pinned: the puller's release freed it
        assert send.state == SendState.RELEASED and send.outcome == SendOutcome.FAILED
        registry.add("req2", "tid2", list(range(8)))
        _, data = _pull(server, "tid2", [0, 1, 2], read_bytes=2 * BLOCK_BYTES)  # within it
        assert torch.equal(data, cache[torch.tensor([0, 1, 2])])
    finally:
        server.close()


def test_registry_refuses_repeated_block_ids():
    registry = SendRegistry(lease_s=10)
    registry.add("req", "t1", [3, 4])
    assert "more than once" in registry.begin_read("t1", [3] * 200_000)
    assert registry.begin_read("t1", [4, 3]) is None  # nothing was left pinned


# ---- 3. nothing about a layout for a peer without the transfer id ------------------------------


def test_a_wrong_layout_without_the_transfer_id_learns_nothing(side_channel):
    server, registry, *_ = side_channel
    registry.add("req", "tid", [1])
    other = msgspec.structs.replace(FINGERPRINT, dtype="bfloat16", model="guess")
    with pytest.raises(TransferFailed, match="unknown") as refused:
        _pull(server, "not-the-id", [1], fingerprint=other)
    for hint in ("dtype", "model", "float32", "layout", "differ"):
        assert hint not in str(refused.value)
    assert len(registry) == 1 and registry.take_finished() == []


# ---- 4, 6. the client against a hostile prefill --------------------------------------------------


class HostilePrefill:
    """A raw-TCP side channel that answers every read with `answer(request)` and acks
    releases, recording them."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.reads = 0
        self.releases: list[wire.ReleaseTransfer] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with sock:
                while True:
                    try:
                        header = recv_exactly(sock, HEADER.size, time.monotonic() + 5)
                        control = recv_exactly(sock, HEADER.unpack(header)[2], time.monotonic() + 5)
                    except OSError:
                        break
                    request = wire.decode_request(control)
                    if isinstance(request, wire.ReleaseTransfer):
                        self.releases.append(request)
                        reply = wire.Ack(version=2, transfer_id=request.transfer_id)
                        sock.sendall(frame(reply))
                    else:
                        self.reads += 1
                        sock.sendall(self.answer(request))

    def close(self) -> None:
        self._listener.close()


def _pull_from(endpoint: str, scatter=lambda *_: None) -> int:
    spec = PullSpec(endpoint, "tid", FINGERPRINT, (1, 2), BLOCK_BYTES)
    return pull_blocks(
        spec, scatter, timeout_s=2, unknown_transfer_grace_s=0.2, max_chunk_bytes=1 << 20
    )


def test_a_prefill_that_keeps_answering_shared_memory_fails_the_pull_at_once():
    """It drove the client into recursion (RecursionError), then a release marked success."""

    def shm_always(request: wire.ReadBlocks) -> bytes:
        header = wire.ShmBlocksHeader(
            version=2,
            transfer_id=request.transfer_id,
            num_blocks=len(request.block_ids),
            block_bytes=BLOCK_BYTES,
            shm_name="llmd_kv_does_not_exist",
        )
        return frame(header)

    prefill = HostilePrefill(shm_always)
    try:
        with pytest.raises(
            TransferFailed, match="ShmBlocksHeader to a read that offered the socket"
        ):
            _pull_from(prefill.endpoint)
        assert prefill.reads <= 2  # shared memory once (unopenable), the socket once
        [release] = prefill.releases
        assert release.success is False and "ShmBlocksHeader" in release.reason
    finally:
        prefill.close()


@pytest.mark.parametrize(
    ("code", "max_reads", "refusal"),
    [
        (wire.UNKNOWN_TRANSFER, 10, r"refused the read \(unknown_transfer\)"),
        (wire.IPC_UNAVAILABLE, 2, r"TransferError \(ipc_unavailable\) to a read that offered"),
    ],
)
def test_a_prefill_repeating_an_error_is_asked_a_bounded_number_of_times(code, max_reads, refusal):
    """unknown_transfer: asked again only within the grace (0.2 s here); ipc_unavailable to a
    read that offered no CUDA IPC: nothing left to drop, so the pull fails."""
    prefill = HostilePrefill(lambda request: frame(wire.error(request.transfer_id, code, "no")))
    try:
        started = time.monotonic()
        with pytest.raises(TransferFailed, match=refusal):
            _pull_from(prefill.endpoint)
        assert time.monotonic() - started < 1.5
        assert prefill.reads <= max_reads
        [release] = prefill.releases
        assert release.success is False
    finally:
        prefill.close()


def test_a_reply_larger_than_the_read_is_refused_before_its_bytes():
    def huge(request: wire.ReadBlocks) -> bytes:
        header = wire.BlocksHeader(
            version=2, transfer_id=request.transfer_id, num_blocks=1 << 30, block_bytes=1 << 20
        )
        return frame(header, data_bytes=1 << 50)

    prefill = HostilePrefill(huge)
    try:
        with pytest.raises(TransferFailed, match="data part of 1125899906842624 bytes exceeds"):
            _pull_from(prefill.endpoint)
        [release] = prefill.releases  # on a new connection: the broken one was closed
        assert release.success is False
    finally:
        prefill.close()


def test_a_scatter_that_fails_releases_the_transfer_as_failed(side_channel):
    server, registry, *_ = side_channel
    registry.add("req", "tid", [1, 2])

    def broken_scatter(first: int, data: torch.Tensor) -> None:
        raise RuntimeError("out of device memory")

    spec = PullSpec(f"tcp://127.0.0.1:{server.port}", "tid", FINGERPRINT, (1, 2), BLOCK_BYTES)
    with pytest.raises(RuntimeError, match="out of device memory"):
        pull_blocks(
            spec, broken_scatter, timeout_s=2, unknown_transfer_grace_s=0, max_chunk_bytes=1 << 20
        )
    [send] = registry.take_finished()
    assert (send.outcome, send.reason) == (SendOutcome.FAILED, "out of device memory")


def test_an_idle_connection_the_server_dropped_is_opened_again(side_channel):
    server, registry, cache, _ = side_channel
    server.connections.max_connections = 1
    _assert_still_serves(server, registry, cache, "first")  # this thread's connection, idle now
    other = threading.Thread(target=_assert_still_serves, args=(server, registry, cache, "other"))
    other.start()  # its connection replaces ours (the least recently active idle one)
    other.join()
    _assert_still_serves(server, registry, cache, "again")  # ours was closed: opened again


# ---- 5. the serving loop ----------------------------------------------------------------------


def test_a_request_that_raises_is_answered_and_the_server_serves_on(side_channel):
    server, registry, cache, _ = side_channel
    registry.add("req", "boom", [1])
    server._gather, gather = (lambda ids, out: 1 / 0), server._gather
    with pytest.raises(TransferFailed, match="internal error: division by zero"):
        _pull(server, "boom", [1])
    server._gather = gather
    _assert_still_serves(server, registry, cache)


def test_a_failed_loop_is_logged_and_later_pulls_fail_fast(side_channel, caplog):
    server, registry, *_ = side_channel

    def broken(now: float) -> None:
        raise RuntimeError("selector gone")

    def logged() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "side channel" in r.getMessage()]

    caplog.set_level(logging.ERROR, logger="vllm")
    server.connections._expire = broken
    deadline = time.monotonic() + 3
    # the loop's thread sets the failure, then logs it: wait for both (a CI run read the
    # records between the two)
    while (server.failure is None or not logged()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.failure == "RuntimeError: selector gone"
    [record] = logged()
    assert record.levelno == logging.ERROR and record.exc_info is not None
    registry.add("req", "tid", [1])
    started = time.monotonic()
    with pytest.raises(TransferFailed, match=r"unavailable.*side channel failed: RuntimeError"):
        pull_blocks(
            PullSpec(f"tcp://127.0.0.1:{server.port}", "tid", FINGERPRINT, (1,), BLOCK_BYTES),
            lambda *_: None,
            timeout_s=5,
            unknown_transfer_grace_s=0,
            max_chunk_bytes=1 << 20,
        )
    assert time.monotonic() - started < 1  # answered, not timed out


def test_a_prefill_trickling_a_reply_is_cut_at_the_deadline():
    """The client refreshes its socket timeout only every few ms (not per socket read):
    a peer sending a byte each millisecond still cannot hold a read past its deadline."""
    ours, theirs = socket.socketpair()
    stop = threading.Event()

    def trickle() -> None:
        while not stop.is_set():
            theirs.send(b"x")
            time.sleep(0.001)

    sender = threading.Thread(target=trickle)
    sender.start()
    try:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            recv_exactly(ours, 1 << 20, start + 0.3)
        assert time.monotonic() - start < 0.3 + 0.1
    finally:
        stop.set()
        sender.join()
        ours.close()
        theirs.close()
