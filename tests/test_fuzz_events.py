"""Fuzzing the KV-event decoders (issue 22): batch payloads, single events, the publisher's
multipart frames, and our ZMTP codec and client.

Every input gets a correct result or the documented error (`MalformedBatchError`, the event
errors that `decode_batch` counts, `FrameError`, `ProtocolError`); what the ZMTP decoder holds
stays within its bound whatever lengths a peer announces; the ZMTP client fed fuzzed bytes by
a raw peer returns messages within its bounds or cuts the connection, and never raises.
Profiles and shared strategies: fuzz_settings.py.
"""

from __future__ import annotations

import socket
import time
import tracemalloc

import msgspec
import pytest
from events_raw_peers import ZMTP_GREETING_31, ready
from fuzz_settings import MSGPACK_SCALARS, NASTY, encodable, examples, mangled, mutated, values
from hypothesis import example, given
from hypothesis import strategies as st
from test_events_bounds import DEEP_PAYLOAD

from vllm_llmd.events import zmtp_codec
from vllm_llmd.events.decoder import (
    MalformedBatchError,
    MalformedEventError,
    UnknownEventError,
    decode_batch,
    decode_event,
)
from vllm_llmd.events.model import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch
from vllm_llmd.events.wire import END_SEQ, FrameError, decode_seq, parse_live, parse_replay
from vllm_llmd.events.zmtp import ZmtpConnection
from vllm_llmd.events.zmtp_codec import (
    FLAG_LONG,
    MAX_COMMAND_BYTES,
    Command,
    FrameDecoder,
    MessageBounds,
    ProtocolError,
    encode_command,
    encode_frame,
    encode_message,
    encode_ready,
    parse_properties,
)

LEAF = st.one_of(values(MSGPACK_SCALARS), NASTY)
# a batch in both event forms: current vLLM's tagged maps, older vLLM's tagged arrays
VALID_BATCH = [
    1.5,
    [
        {
            "type": "BlockStored",
            "block_hashes": [1, 2**64 - 1],
            "parent_block_hash": b"\x01" * 32,
            "token_ids": [1, 2, 3],
            "block_size": 16,
            "medium": "GPU",
            "extra_keys": [None, ["x", 1]],
            "lookahead_token_ids": [[4, 5]],
        },
        ["BlockStored", [7], None, list(range(16)), 16, None, "CPU"],
        {"type": "BlockRemoved", "block_hashes": [b"\x02" * 32], "medium": "GPU"},
        ["BlockRemoved", [3], "CPU"],
        {"type": "AllBlocksCleared"},
        ["AllBlocksCleared"],
    ],
    0,
]
EVENTS = (BlockStored, BlockRemoved, AllBlocksCleared)


def _check_batch(payload: bytes) -> EventBatch | None:
    try:
        batch = decode_batch(payload)
    except MalformedBatchError:
        return None
    assert isinstance(batch, EventBatch)
    assert all(isinstance(event, EVENTS) for event in batch.events)
    raw = msgspec.msgpack.decode(payload)
    # every event is decoded, counted as malformed, or counted as unknown: none is lost
    assert len(batch.events) + batch.num_malformed + batch.num_unknown == len(raw[1])
    return batch


def test_the_valid_batch_decodes_whole():
    batch = _check_batch(msgspec.msgpack.encode(VALID_BATCH))
    assert batch is not None and len(batch.events) == 6 and batch.data_parallel_rank == 0


@examples(800)
@given(
    st.one_of(
        st.binary(max_size=300),
        mutated(VALID_BATCH, LEAF),
        st.just(msgspec.msgpack.encode(VALID_BATCH)).flatmap(mangled),
    )
)
@example(DEEP_PAYLOAD)
@example(msgspec.msgpack.encode([1.0, [{"type": "BlockStored", 1: 2, (1,): 3}]]))
@example(msgspec.msgpack.encode([1.0, [["BlockStored", [2**64 - 1], 2**64 - 1, [-1], -1]]]))
@example(b"\x93\xcb" + msgspec.msgpack.encode(1.5)[1:] + b"\x91" + b"\x81\x91" * 50_000 + b"\xc0")
def test_a_payload_is_a_batch_or_a_malformed_batch_error(payload):
    if not isinstance(payload, bytes):  # a mutated batch: encode it (if it still is msgpack)
        payload = encodable(payload)
        if payload is None:
            return
    _check_batch(payload)


@examples(600)
@given(
    st.one_of(
        st.sampled_from(VALID_BATCH[1]).flatmap(lambda event: mutated(event, LEAF)),
        LEAF,
    )
)
@example({"type": "BlockStored", "block_hashes": [True]})
@example(["BlockStored", [1], [1]])
@example({"type": ["BlockStored"]})
def test_an_event_decodes_or_raises_an_event_error(raw):
    try:
        event = decode_event(raw)
    except (UnknownEventError, MalformedEventError):
        return
    assert isinstance(event, EVENTS)


# ---- the publisher's multipart frames ---------------------------------------------------------


FRAMES = st.lists(st.binary(max_size=12), max_size=6)


@examples(200)
@given(FRAMES)
@example([b"kv", b"\x00" * 8, b"payload"])
@example([b"", b"kv", END_SEQ, b""])
@example([b"", END_SEQ, b""])
def test_live_and_replay_frames_parse_or_are_a_frame_error(frames):
    for parse in (parse_live, parse_replay):
        try:
            message = parse(frames)
        except FrameError:
            continue
        if message is not None:
            assert 0 <= message.seq < 2**64
    try:
        assert 0 <= decode_seq(frames[0] if frames else b"") < 2**64
    except FrameError:
        pass


# ---- ZMTP: the frame decoder, greeting and READY properties ----------------------------------


BOUNDS = MessageBounds(max_frames=4, max_message_bytes=1024)


def _zmtp_stream() -> st.SearchStrategy[bytes]:
    """ZMTP bytes: valid frames, messages and commands in a row, mangled, or random."""
    valid = st.one_of(
        st.lists(st.binary(max_size=300), min_size=1, max_size=5).map(encode_message),
        st.builds(encode_command, st.binary(max_size=8), st.binary(max_size=40)),
        st.builds(encode_ready, st.sampled_from(["PUB", "ROUTER", "SUB"])),
        st.builds(
            encode_frame,
            st.binary(max_size=300),
            more=st.booleans(),
            command=st.booleans(),
        ),
        st.builds(
            lambda flags, size: bytes([flags]) + size.to_bytes(8, "big"),
            st.integers(0, 255),
            st.integers(0, 2**64 - 1),
        ),
    )
    stream = st.lists(valid, max_size=6).map(b"".join)
    return st.one_of(stream, stream.flatmap(mangled), st.binary(max_size=200))


@examples(800)
@given(_zmtp_stream(), st.lists(st.integers(1, 64), min_size=1, max_size=8))
@example(bytes([FLAG_LONG]) + (2**63).to_bytes(8, "big"), [9])
@example(bytes([0x04, 0]), [2])  # an empty command: no name
@example(bytes([0x01, 0]) * 5, [10])  # more frames than the bound
def test_the_frame_decoder_yields_bounded_items_or_a_protocol_error(data, cuts):
    """Fed in reads of the sizes `cuts` (then the rest), the decoder yields messages and
    commands within its bounds, or ProtocolError; what it holds stays within its bound."""
    decoder = FrameDecoder(BOUNDS)
    limit = max(BOUNDS.max_message_bytes, MAX_COMMAND_BYTES)
    pos = 0
    try:
        for size in [*cuts, len(data)]:
            chunk, pos = data[pos : pos + size], pos + size
            decoder.feed(chunk)
            while (item := decoder.next()) is not None:
                if isinstance(item, Command):
                    assert len(item.name) + len(item.data) < MAX_COMMAND_BYTES
                else:
                    assert 1 <= len(item) <= BOUNDS.max_frames
                    assert sum(map(len, item)) <= BOUNDS.max_message_bytes
            assert decoder.buffered_bytes <= limit + len(chunk) + 9
    except ProtocolError:
        pass


@examples(200)
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=4), st.integers(1, 50))
def test_valid_messages_come_out_as_they_went_in(frames, read_size):
    data = encode_message(frames) + encode_command(b"PING", b"\x00\x01ctx") + encode_message(frames)
    decoder = FrameDecoder(MessageBounds(max_frames=4, max_message_bytes=1 << 20))
    items = []
    for pos in range(0, len(data), read_size):
        decoder.feed(data[pos : pos + read_size])
        while (item := decoder.next()) is not None:
            items.append(item)
    assert items == [frames, Command(b"PING", b"\x00\x01ctx"), frames]
    assert decoder.buffered_bytes == 0


def test_a_frame_claiming_2_to_the_40_bytes_is_refused_before_allocation():
    decoder = FrameDecoder(MessageBounds(max_frames=4, max_message_bytes=1 << 20))
    tracemalloc.start()
    try:
        decoder.feed(bytes([FLAG_LONG]) + (1 << 40).to_bytes(8, "big") + bytes(64))
        with pytest.raises(ProtocolError, match="a frame of 1099511627776 bytes"):
            decoder.next()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 10


@examples(300)
@given(
    st.one_of(
        st.binary(max_size=70),
        st.just(ZMTP_GREETING_31).flatmap(mangled),
    )
)
def test_a_greeting_is_checked_or_a_protocol_error(data):
    for end in range(len(data) + 1):  # as each byte arrives
        try:
            minor = zmtp_codec.check_greeting(data[:end])
        except ProtocolError:
            return
        if end < 64:
            assert minor is None
        else:
            assert isinstance(minor, int) and 0 <= minor <= 255


@examples(300)
@given(
    st.one_of(
        st.binary(max_size=80),
        st.just(encode_ready("DEALER", b"id")[3:]).flatmap(mangled),
    )
)
@example(b"\x05READY" + b"\xff\xff\xff\xff")
def test_ready_properties_parse_or_are_a_protocol_error(data):
    try:
        properties = parse_properties(data)
    except ProtocolError:
        return
    assert sum(len(name) + len(value) for name, value in properties.items()) <= len(data)


# ---- the ZMTP client against a raw peer sending fuzzed bytes --------------------------------


@pytest.fixture(scope="module")
def raw_listener():
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)
    try:
        yield listener
    finally:
        listener.close()


@examples(100)
@given(_zmtp_stream(), st.booleans())
@example(encode_command(b"ERROR", b""), True)
@example(encode_command(b"PING", b""), False)
@example(encode_command(b"READY", b"\x0bSocket-Type\x00\x00\x00\x03PUB"), True)
def test_the_zmtp_client_takes_fuzzed_bytes_without_raising(raw_listener, data, hang_up):
    """After a valid handshake the peer sends `data` (and hangs up, or stays): the client
    delivers messages within its bounds under the subscribed prefix, or cuts the peer."""
    port = raw_listener.getsockname()[1]
    connection = ZmtpConnection(
        f"tcp://127.0.0.1:{port}", "SUB", BOUNDS, subscribe=b"", handshake_timeout=1
    )
    peer, _ = raw_listener.accept()
    try:
        peer.sendall(ZMTP_GREETING_31 + ready(b"PUB") + data)
        if hang_up:
            peer.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            message = connection.recv(0.02)
            if message is None:
                break
            assert 1 <= len(message) <= BOUNDS.max_frames
            assert sum(map(len, message)) <= BOUNDS.max_message_bytes
        assert connection.buffered_bytes <= BOUNDS.max_message_bytes + MAX_COMMAND_BYTES + (1 << 17)
    finally:
        connection.close()
        peer.close()
        _drain(raw_listener)


def _drain(listener: socket.socket) -> None:
    """Close the connections the client opened again after a cut (none is served)."""
    listener.setblocking(False)
    try:
        while True:
            listener.accept()[0].close()
    except BlockingIOError:
        pass
    finally:
        listener.settimeout(5)
