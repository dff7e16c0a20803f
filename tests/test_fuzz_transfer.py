"""Fuzzing the P/D side channel's decoders (issue 22): control messages, frame headers,
`kv_transfer_params`, key shares, and a real prefill-side server on loopback fed fuzzed frames,
in clear and sealed (TLS on: fuzzed frames in valid records, and fuzzed records).

Every input gets a correct result or the documented error (`WireError`, `ParamsError`); the
server answers or disconnects, never hangs, keeps serving good pulls, and leaves no transfer
pinned (READING) once its lease is over. Profiles and shared strategies: fuzz_settings.py.
"""

from __future__ import annotations

import socket
import time
import tracemalloc

import msgspec
import pytest
from fuzz_settings import MSGPACK_SCALARS, NASTY, encodable, examples, mangled, mutated, values
from hypothesis import example, given
from hypothesis import strategies as st
from test_transfer import FINGERPRINT, _byte_cache_server
from test_transfer_hostile import _assert_still_serves
from test_transfer_tls import _assert_still_serves as _assert_still_serves_sealed
from test_transfer_tls import _files, make_pki

from vllm_llmd.transfer import messages as wire
from vllm_llmd.transfer.framing import HEADER, MAGIC, frame, frame_header, parse_header
from vllm_llmd.transfer.params import ParamsError, RemotePrefillParams, prompt_digest
from vllm_llmd.transfer.sealed_stream import SealedStream
from vllm_llmd.transfer.sealing import SealError
from vllm_llmd.transfer.tls import make_client_context, make_server_context

FINGERPRINT_DICT = msgspec.to_builtins(FINGERPRINT)
INT64 = st.integers(-(2**63), 2**63 - 1)
TRANSFER_ID = "fuzz-tid"
HELD_BLOCKS = [1, 2, 3]


def _builtins(message: wire.Request | wire.Reply) -> dict:
    return msgspec.msgpack.decode(wire.encode(message))


VALID_REQUESTS = [
    wire.ReadBlocks(
        version=wire.PROTOCOL_VERSION,
        transfer_id=TRANSFER_ID,
        fingerprint=FINGERPRINT,
        block_ids=[1, 2],
    ),
    wire.ReadBlocks(
        version=wire.PROTOCOL_VERSION,
        transfer_id=TRANSFER_ID,
        fingerprint=FINGERPRINT,
        block_ids=[3],
        host_id="some-host",
        ipc_cache=wire.CudaIpcCache(
            device_uuid="GPU-0",
            storages=[wire.CudaIpcStorage(handle=bytes(64), offset_bytes=0, size_bytes=4096)],
            segment_storages=[0],
            segment_offsets=[0],
            num_blocks=4,
            page_bytes=96,
            block_stride=96,
        ),
        ipc_block_ids=[0],
    ),
    wire.ReleaseTransfer(version=wire.PROTOCOL_VERSION, transfer_id=TRANSFER_ID, success=True),
]
VALID_REPLIES = [
    wire.BlocksHeader(version=2, transfer_id="t", num_blocks=2, block_bytes=288),
    wire.ShmBlocksHeader(version=2, transfer_id="t", num_blocks=2, block_bytes=288, shm_name="s"),
    wire.IpcBlocksWritten(version=2, transfer_id="t", num_blocks=1),
    wire.Ack(version=2, transfer_id="t"),
    wire.error("t", wire.BAD_REQUEST, "no"),
]
MSGPACK_LEAF = st.one_of(values(MSGPACK_SCALARS), NASTY)


def _near_valid(messages: list) -> st.SearchStrategy[bytes]:
    """Valid messages with one field changed (then encoded), or their bytes mangled."""
    as_dicts = [_builtins(m) for m in messages]
    changed = st.sampled_from(as_dicts).flatmap(lambda d: mutated(d, MSGPACK_LEAF)).map(encodable)
    mangled_bytes = st.sampled_from([wire.encode(m) for m in messages]).flatmap(mangled)
    return st.one_of(changed.filter(lambda b: b is not None), mangled_bytes)


def _assert_decodes_or_wire_error(decode, data: bytes, types: tuple) -> None:
    try:
        message = decode(data)
    except wire.WireError:
        return
    assert isinstance(message, types)
    assert message.version == wire.PROTOCOL_VERSION


# ---- control messages -------------------------------------------------------------------------


@examples(1000)
@given(st.one_of(st.binary(max_size=200), _near_valid(VALID_REQUESTS)))
@example(b"\x91" * 200_000 + b"\xc0")  # nesting past msgspec's depth guard
@example(b"\x81\xa4type\xa4read" + b"\x91" * 100_000 + b"\xc0")
def test_a_request_frame_decodes_or_is_a_wire_error(data):
    _assert_decodes_or_wire_error(
        wire.decode_request, data, (wire.ReadBlocks, wire.ReleaseTransfer)
    )


@examples(600)
@given(st.one_of(st.binary(max_size=200), _near_valid(VALID_REPLIES)))
def test_a_reply_frame_decodes_or_is_a_wire_error(data):
    replies = (
        wire.BlocksHeader,
        wire.ShmBlocksHeader,
        wire.IpcBlocksWritten,
        wire.Ack,
        wire.TransferError,
    )
    _assert_decodes_or_wire_error(wire.decode_reply, data, replies)


def test_an_oversized_control_frame_is_refused_before_decoding():
    oversized = memoryview(bytes(wire.MAX_CONTROL_BYTES + 1))
    tracemalloc.start()
    try:
        with pytest.raises(wire.WireError, match="exceeds"):
            wire.decode_request(oversized)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 10  # nothing decoded, nothing copied


@examples(200)
@given(
    st.one_of(
        st.binary(min_size=HEADER.size, max_size=HEADER.size),
        st.builds(
            HEADER.pack,
            st.sampled_from([MAGIC, b"LLMd", b"\xff\x00\x00\x00"]),
            st.integers(0, 2**16 - 1),
            st.integers(0, 2**32 - 1),
            st.integers(0, 2**64 - 1),
        ),
    ),
    st.integers(0, 2**64 - 1),
)
@example(frame_header(2**32 - 1, 2**64 - 1), 0)
def test_a_frame_header_is_bounded_or_a_wire_error(header, max_data_bytes):
    try:
        control_bytes, data_bytes = parse_header(header, max_data_bytes)
    except wire.WireError:
        return
    assert header[:4] == MAGIC
    assert control_bytes <= wire.MAX_CONTROL_BYTES and data_bytes <= max_data_bytes


# ---- kv_transfer_params -----------------------------------------------------------------------


def _valid_params() -> dict:
    prompt = list(range(40))
    return RemotePrefillParams(
        engine_id="engine",
        request_id="req",
        host="10.0.0.1",
        ports=(5600, 5601),
        block_ids=(7, 8, 9),
        num_tokens=40,
        transfer_id="AbC-123_x",
        fingerprint=FINGERPRINT,
        prompt_digest=prompt_digest(prompt),
    ).to_dict()


JSON_LEAF = st.one_of(values(), NASTY)


@examples(600)
@given(st.one_of(mutated(_valid_params(), JSON_LEAF), values()))
@example({**_valid_params(), "remote_host": "fe80::1%eth0"})
@example({**_valid_params(), "remote_host": "1" * 300})
@example({**_valid_params(), "remote_block_ids": list(range(1 << 16)), "remote_num_tokens": 1})
@example({**_valid_params(), "llmd_fingerprint": {**FINGERPRINT_DICT, "block_size": 0}})
@example({**_valid_params(), 5: 1})
def test_kv_transfer_params_parse_or_are_a_params_error(params):
    try:
        parsed = RemotePrefillParams.from_dict(params)
    except ParamsError:
        return
    # what parsed is exactly what to_dict makes of it (nothing half-checked slips through)
    assert RemotePrefillParams.from_dict(parsed.to_dict()) == parsed
    assert parsed.fingerprint.block_size > 0
    assert len(set(parsed.block_ids)) == len(parsed.block_ids) >= 1
    assert all(0 <= b < 1 << 31 for b in parsed.block_ids)
    assert all(1 <= p <= 65535 for p in parsed.ports)


# ---- a real server fed fuzzed frames ----------------------------------------------------------


@pytest.fixture(scope="module")
def fuzzed_server():
    """One prefill-side server for all examples (a function-scoped fixture would be shared
    across examples anyway). Lease 0: a transfer not pinned by a read expires at once, so
    after each example every transfer must drain from the registry."""
    server, registry, cache, _ = _byte_cache_server(same_host_shm=False)
    registry.lease_s = 0
    try:
        yield server, registry, cache
    finally:
        server.close()


def _framed(control: bytes) -> bytes:
    return frame_header(len(control)) + control


def _request_frames() -> st.SearchStrategy[bytes]:
    mutated_requests = _near_valid(VALID_REQUESTS).map(_framed)
    read = st.builds(
        wire.ReadBlocks,
        version=st.sampled_from([wire.PROTOCOL_VERSION, 1, 3]),
        transfer_id=st.sampled_from([TRANSFER_ID, "", "other"]),
        fingerprint=st.sampled_from(
            [FINGERPRINT, msgspec.structs.replace(FINGERPRINT, num_layers=1)]
        ),
        block_ids=st.lists(st.one_of(st.sampled_from(HELD_BLOCKS), INT64), max_size=6),
        host_id=st.sampled_from(["", "host"]),
        ipc_block_ids=st.lists(INT64, max_size=3),
    )
    release = st.builds(
        wire.ReleaseTransfer,
        version=st.just(wire.PROTOCOL_VERSION),
        transfer_id=st.sampled_from([TRANSFER_ID, "other"]),
        success=st.booleans(),
        reason=st.text(max_size=10),
    )
    typed = st.one_of(read, release).map(frame)
    raw = st.one_of(
        st.binary(max_size=64),
        st.binary(max_size=64).map(lambda b: frame_header(len(b)) + b),
        st.builds(frame_header, st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)),
    )
    frames = st.one_of(typed, mutated_requests, raw)
    # sometimes two frames in a row (the second read after the first is answered), or mangled
    return st.one_of(
        frames,
        st.tuples(frames, frames).map(b"".join),
        frames.flatmap(mangled),
    )


def _exchange(port: int, data: bytes) -> bytes:
    """Send data, end our side, and read all the server sends until it closes (5 s at most)."""
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        deadline = time.monotonic() + 5
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # refused mid-send (reset, not connected): closed by the server
            pass
        try:
            while True:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                received += chunk
        except ConnectionResetError:
            pass  # closed by the server before we read all of it
        except TimeoutError:
            raise AssertionError("the server neither answered nor closed within 5 s") from None
    return bytes(received)


def _replies(data: bytes) -> list[wire.Reply]:
    """The frames the server sent: each a valid reply (a BlocksHeader with its data part)."""
    replies, pos = [], 0
    while pos < len(data):
        control_bytes, data_bytes = parse_header(data[pos : pos + HEADER.size], 1 << 20)
        pos += HEADER.size
        replies.append(wire.decode_reply(data[pos : pos + control_bytes]))
        pos += control_bytes + data_bytes
        assert pos <= len(data), "a reply frame cut short"
    return replies


@examples(300)
@given(_request_frames())
@example(frame_header(2**32 - 1))
@example(frame_header(10, 2**64 - 1))
@example(b"\xff" + bytes(8) + b"\x7f")
def test_the_server_answers_fuzzed_frames_and_keeps_serving(fuzzed_server, data):
    server, registry, cache = fuzzed_server
    registry.add("req-fuzz", TRANSFER_ID, HELD_BLOCKS)
    for reply in _replies(_exchange(server.port, data)):
        if isinstance(reply, wire.BlocksHeader):
            assert reply.transfer_id == TRANSFER_ID and reply.num_blocks <= len(HELD_BLOCKS)
    _assert_still_serves(server, registry, cache)
    # nothing is pinned: with the lease over, every transfer is finished and drained
    registry.take_finished()
    assert len(registry) == 0 and registry.num_blocks_held() == 0
    assert server.connections.buffered_bytes == 0 or _settles(server)
    assert server.failure is None


def _settles(server) -> bool:
    """The server's held request bytes drop to 0 (it closes our connection a moment later)."""
    deadline = time.monotonic() + 2
    while server.connections.buffered_bytes and time.monotonic() < deadline:
        time.sleep(0.01)
    return server.connections.buffered_bytes == 0


# ---- sealed connections (TLS on) --------------------------------------------------------------


@examples(400)
@given(
    st.one_of(
        st.binary(max_size=120),
        _near_valid([wire.KeyShare(version=wire.PROTOCOL_VERSION, share=bytes(32))]),
    )
)
def test_a_key_share_decodes_or_is_a_wire_error(data):
    _assert_decodes_or_wire_error(wire.decode_key_share, data, (wire.KeyShare, wire.TransferError))


@pytest.fixture(scope="module")
def sealed_server(tmp_path_factory):
    pki = make_pki(tmp_path_factory)
    server, registry, cache, _ = _byte_cache_server(
        same_host_shm=False, tls=make_server_context(*_files(pki, "prefill"))
    )
    registry.lease_s = 0
    try:
        yield server, registry, cache, pki
    finally:
        server.close()


def _sealed_inputs() -> st.SearchStrategy[tuple[str, bytes]]:
    """("sealed", frames sealed as the protocol does) or ("raw", bytes written unsealed after
    the key shares: record headers of any length, garbage, a cut record)."""
    raw = st.one_of(
        st.binary(max_size=64),
        st.builds(
            lambda n, rest: n.to_bytes(4, "big") + rest,
            st.integers(0, 2**32 - 1),
            st.binary(max_size=64),
        ),
    )
    return st.one_of(
        st.tuples(st.just("sealed"), _request_frames()),
        st.tuples(st.just("raw"), raw),
    )


@examples(150)
@given(_sealed_inputs())
@example(("raw", (2**32 - 1).to_bytes(4, "big")))
@example(("raw", (16).to_bytes(4, "big") + bytes(16)))  # an empty record with a forged tag
def test_a_sealed_server_answers_fuzzed_records_and_keeps_serving(sealed_server, case):
    server, registry, cache, pki = sealed_server
    registry.add("req-fuzz", TRANSFER_ID, HELD_BLOCKS)
    kind, data = case
    decode = make_client_context(*_files(pki, "decode"))
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    stream = SealedStream(sock, decode, server_hostname="127.0.0.1")
    try:
        try:
            if kind == "sealed":
                stream.sendall(data)
            else:
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # refused mid-send (reset, not connected): closed by the server
            pass
        buffer = memoryview(bytearray(1 << 16))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the replies, then the close
            stream.settimeout(max(0.01, deadline - time.monotonic()))
            if stream.recv_into(buffer) == 0:
                break
        else:
            raise AssertionError("the server neither answered nor closed within 5 s")
    except (ConnectionError, SealError):
        pass  # closed by the server mid-reply, or a record of it cut by the close
    except TimeoutError:
        raise AssertionError("the server neither answered nor closed within 5 s") from None
    finally:
        stream.close()
    _assert_still_serves_sealed(server, registry, cache, pki)
    registry.take_finished()
    assert len(registry) == 0 and registry.num_blocks_held() == 0
    assert server.connections.buffered_bytes == 0 or _settles(server)
    assert server.failure is None
