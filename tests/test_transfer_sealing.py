"""Sealed records of the side channel with TLS on (issue 22): real sockets, certificates made at
test time, and a relay between the two sides that records, or alters, every byte on the wire.

What each test proves: records open only in order, under their direction's key, unaltered;
none of the KV crosses the wire in clear (and the same check finds it in a plain pull, so it
can fail); a record altered on the wire, either way, fails that pull cleanly (no wrong bytes
delivered, the blocks freed, the server serving on); a record announcing more than the bound
is refused before it is read, and what a connection holds before its tag is checked counts
in the listener's bound; a decode or a prefill of a version that does not seal is refused with
a message that says so.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
import types

import pytest
import torch
from test_transfer import FINGERPRINT, _byte_cache_server
from test_transfer_tls import (
    _assert_still_serves,
    _assert_untouched,
    _files,
    _pull,
    _pull_all,
    _served_cache,
    make_pki,
)

from vllm_llmd.transfer import messages as wire
from vllm_llmd.transfer.client import TransferFailed
from vllm_llmd.transfer.framing import HEADER, frame
from vllm_llmd.transfer.registry import SendOutcome
from vllm_llmd.transfer.sealed_stream import SealedStream
from vllm_llmd.transfer.sealing import (
    MAX_REQUEST_RECORD_PLAINTEXT,
    RECORD_HEADER,
    Opener,
    Sealer,
    SealError,
    derive_keys,
)
from vllm_llmd.transfer.tls import make_client_context, make_server_context


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory)


# ---- the record layer -------------------------------------------------------------------------


def _sealed(sealer: Sealer, plaintext: bytes) -> memoryview:
    out = memoryview(bytearray(len(plaintext) + 64))
    return out[: sealer.seal_into(memoryview(plaintext), out)]


def _open(opener: Opener, record: memoryview) -> bytes:
    out = memoryview(bytearray(len(record)))
    return bytes(out[: opener.open_into(record[RECORD_HEADER.size :], out)])


def test_records_open_in_order_under_their_key_and_unaltered():
    to_server, to_client = derive_keys(b"c" * 32, b"s" * 32)
    assert to_server != to_client and len(to_server) == len(to_client) == 32
    assert derive_keys(b"c" * 32, b"t" * 32)[0] != to_server  # each share changes both keys
    sealer = Sealer(to_server)
    records = [_sealed(sealer, b"record %d" % i) for i in range(3)]
    assert b"record" not in b"".join(bytes(r) for r in records)
    opener = Opener(to_server)
    assert _open(opener, records[0]) == b"record 0"
    with pytest.raises(SealError):  # replayed: record 0 again where record 1 belongs
        _open(opener, records[0])
    cases = {
        "reordered": [records[1], records[0]],
        "altered": [memoryview(bytearray(records[0]))],
        "the other direction's key": [records[0]],
    }
    cases["altered"][0][-20] ^= 1
    for case, sequence in cases.items():
        opener = Opener(to_client if case == "the other direction's key" else to_server)
        with pytest.raises(SealError, match="failed authentication"):
            for record in sequence:
                _open(opener, record)


# ---- a relay on the wire ------------------------------------------------------------------------


class _Relay:
    """Forwards TCP connections to the prefill worker's port, recording both directions; may
    flip one byte of the first connection's stream in one direction (`flip`: (direction, at))."""

    def __init__(self, port: int, flip: tuple[str, int] | None = None) -> None:
        self._port = port
        self._flip = flip
        self.sent = {"to_decode": bytearray(), "to_prefill": bytearray()}
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                decode, _ = self._listener.accept()
            except OSError:
                return
            prefill = socket.create_connection(("127.0.0.1", self._port))
            first = self._connections == 0
            self._connections += 1
            for direction, source, sink in (
                ("to_prefill", decode, prefill),
                ("to_decode", prefill, decode),
            ):
                flip = self._flip if first and self._flip and self._flip[0] == direction else None
                threading.Thread(
                    target=self._pump, args=(direction, source, sink, flip), daemon=True
                ).start()

    def _pump(self, direction, source, sink, flip) -> None:
        passed = 0
        try:
            while chunk := source.recv(1 << 16):
                chunk = bytearray(chunk)
                if flip is not None and passed <= flip[1] < passed + len(chunk):
                    chunk[flip[1] - passed] ^= 0x01
                passed += len(chunk)
                self.sent[direction] += chunk
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def close(self) -> None:
        self._listener.close()


class _Relayed:
    """A server seen through a relay: what `_pull` needs of it (its port)."""

    def __init__(self, relay: _Relay) -> None:
        self.port = relay.port


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "sealed"])
def test_none_of_the_kv_crosses_the_wire_in_clear(pki, tls):
    server, registry, cache, _ = _byte_cache_server(
        same_host_shm=False, tls=make_server_context(*_files(pki, "prefill")) if tls else None
    )
    relay = _Relay(server.port)
    try:
        blocks = [9, 2, 14, 5, 7]
        registry.add("req", "tid", blocks)
        decode = make_client_context(*_files(pki, "decode")) if tls else None
        _, data = _pull(_Relayed(relay), "tid", blocks, decode)
        assert torch.equal(data, cache[torch.tensor(blocks)])
        wire_bytes = bytes(relay.sent["to_decode"])
        samples = [cache[block].numpy().tobytes()[i : i + 32] for block in blocks for i in (0, 96)]
        seen = [sample in wire_bytes for sample in samples]
        assert seen == [not tls] * len(samples)
        assert (b"tid" in bytes(relay.sent["to_prefill"])) == (not tls)  # nor the transfer id
    finally:
        relay.close()
        server.close()


@pytest.mark.parametrize("direction", ["to_decode", "to_prefill"])
def test_a_record_altered_on_the_wire_fails_the_pull_and_frees_the_blocks(pki, direction, caplog):
    caplog.set_level(logging.WARNING, logger="vllm")
    cache, registry, server = _served_cache(pki, 8)
    # to the decode: inside the first reply's data part (past the handshake, ~3 KiB); to the
    # prefill: the read request's record, past the key share
    at = 100_000 if direction == "to_decode" else None
    decode = make_client_context(*_files(pki, "decode"))
    if at is None:  # the decode's bytes up to its first sealed record: learnt from a clean run
        probe = _Relay(server.port)
        _pull_all(_Relayed(probe), registry, cache, "probe", 4 << 20, decode)
        probe.close()
        at = _first_sealed_record_at(bytes(probe.sent["to_prefill"])) + RECORD_HEADER.size + 8
    relay = _Relay(server.port, flip=(direction, at))
    try:
        with pytest.raises(TransferFailed) as failure:
            _pull_all(_Relayed(relay), registry, cache, "tid", 4 << 20, decode)
        if direction == "to_decode":
            assert "failed authentication" in str(failure.value)
        else:  # the prefill worker found it, said so and closed the connection
            logged = [r.getMessage() for r in caplog.records]
            assert any("failed authentication" in message for message in logged)
        # the release after the failure went over a new (unaltered) connection
        finished = {send.transfer_id: send for send in registry.take_finished()}
        assert finished["tid"].outcome == SendOutcome.FAILED
        assert len(registry) == 0
        received = _pull_all(server, registry, cache, "after", 4 << 20, decode)
        assert torch.equal(received, cache)
        assert server.connections.failure is None
    finally:
        relay.close()
        server.close()


def _first_sealed_record_at(to_prefill: bytes) -> int:
    """Where the decode's first sealed record starts: after its TLS records (type 0x17 and
    friends, 5-byte headers) of the handshake and the key share."""
    at = 0
    while to_prefill[at] in (0x14, 0x15, 0x16, 0x17):  # TLS record content types
        at += 5 + int.from_bytes(to_prefill[at + 3 : at + 5], "big")
    return at


# ---- hostile and mismatched peers --------------------------------------------------------------


def test_a_record_over_the_bound_is_refused_before_it_is_read(pki):
    server, registry, cache, gathers = _byte_cache_server(
        same_host_shm=False, tls=make_server_context(*_files(pki, "prefill"))
    )
    streams: list[SealedStream] = []
    try:
        registry.add("req", "tid", [1, 2])
        decode = make_client_context(*_files(pki, "decode"))
        for _ in range(2):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=3)
            streams.append(SealedStream(sock, decode, server_hostname="127.0.0.1"))
        over, held = streams
        over._sock.sendall(RECORD_HEADER.pack(1 << 30))  # announces 1 GiB
        # most of a record at the bound, never finished: held, counted, then let go
        held._sock.sendall(RECORD_HEADER.pack(MAX_REQUEST_RECORD_PLAINTEXT + 16))
        held._sock.sendall(bytes(MAX_REQUEST_RECORD_PLAINTEXT))
        assert over._sock.recv(1) == b""  # closed by the server
        deadline = time.monotonic() + 3
        listener = server.connections
        while (
            listener.buffered_bytes < MAX_REQUEST_RECORD_PLAINTEXT and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        assert (
            MAX_REQUEST_RECORD_PLAINTEXT
            <= listener.buffered_bytes
            < 2 * MAX_REQUEST_RECORD_PLAINTEXT
        )
        held.close()
        while listener.buffered_bytes and time.monotonic() < deadline:
            time.sleep(0.01)
        assert listener.buffered_bytes == 0
        assert listener.max_buffered_seen < 2 * MAX_REQUEST_RECORD_PLAINTEXT
        _assert_untouched(registry, gathers)
        _assert_still_serves(server, registry, cache, pki)
    finally:
        for stream in streams:
            stream.close()
        server.close()


def test_a_decode_that_does_not_seal_is_refused_before_a_request_is_read(pki, caplog):
    """A decode of an older version: mutual TLS, then its read request straight inside TLS."""
    caplog.set_level(logging.WARNING, logger="vllm")
    server, registry, cache, gathers = _byte_cache_server(
        same_host_shm=False, tls=make_server_context(*_files(pki, "prefill"))
    )
    try:
        registry.add("req", "tid", [1, 2])
        decode = make_client_context(*_files(pki, "decode"))
        read = wire.ReadBlocks(
            version=wire.PROTOCOL_VERSION, transfer_id="tid", fingerprint=FINGERPRINT, block_ids=[1]
        )
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=3)
        with decode.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            sock.sendall(frame(read))
            try:
                assert sock.recv(1 << 16) == b""  # nothing but the close
            except (ssl.SSLError, ConnectionResetError):
                pass
        deadline = time.monotonic() + 3
        while server.connections.tls_refused == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.connections.tls_refused == 1
        assert any("key share" in r.getMessage() for r in caplog.records)
        _assert_untouched(registry, gathers)
        _assert_still_serves(server, registry, cache, pki)
    finally:
        server.close()


def test_a_prefill_that_does_not_seal_is_named(pki):
    """A prefill of an older version: mutual TLS, then it answers the key share as it answers
    any unknown message (bad_request)."""
    context = make_server_context(*_files(pki, "prefill"))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def old_prefill() -> None:
        raw, _ = listener.accept()
        with context.wrap_socket(raw, server_side=True) as sock:
            header = sock.recv(HEADER.size)
            control_bytes = HEADER.unpack(header)[2]
            control = sock.recv(control_bytes)
            try:
                wire.decode_request(control)
            except wire.WireError as exc:
                sock.sendall(frame(wire.error("", wire.BAD_REQUEST, str(exc))))
            sock.recv(1)

    thread = threading.Thread(target=old_prefill, daemon=True)
    thread.start()
    try:
        decode = make_client_context(*_files(pki, "decode"))
        server = types.SimpleNamespace(port=port)
        with pytest.raises(TransferFailed, match="does not seal its side channel"):
            _pull(server, "tid", [1], decode, timeout_s=3)
    finally:
        listener.close()
        thread.join(timeout=3)
