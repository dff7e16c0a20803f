"""Frames of vLLM's ZmqEventPublisher, as raw messages: transport only, no decoding.

PUB socket, one multipart message per engine step that had events:

    [topic, seq (8-byte big-endian unsigned), payload (msgpack KVEventBatch)]

`seq` counts from 0 per publisher process, so it restarts at 0 when the engine restarts.

Replay ROUTER socket, as a DEALER client sees it:

    request   [b"", start_seq (8 bytes)]
    replies   [b"", topic, seq, payload]   one per buffered batch with seq >= start_seq
              [b"", seq, payload]          (older vLLM: no topic frame)
    end       [b"", b"", END_SEQ, b""]     END_SEQ is -1 as 8 signed bytes (0xFF * 8)
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

END_SEQ = (-1).to_bytes(8, "big", signed=True)


class FrameError(ValueError):
    """A multipart message that is not in the publisher's format."""


class RawMessage(msgspec.Struct, frozen=True):
    """One published batch, still encoded: what the transport hands to the decoder."""

    topic: bytes
    seq: int
    payload: bytes


def encode_seq(seq: int) -> bytes:
    """A sequence number as the 8-byte big-endian frame."""
    return seq.to_bytes(8, "big")


def decode_seq(frame: bytes) -> int:
    """The sequence number in an 8-byte frame."""
    if len(frame) != 8:
        raise FrameError(f"sequence frame must be 8 bytes, got {len(frame)}")
    return int.from_bytes(frame, "big")


def parse_live(frames: Sequence[bytes]) -> RawMessage:
    """A message from the PUB socket: `[topic, seq, payload]`."""
    if len(frames) != 3:
        raise FrameError(f"expected [topic, seq, payload], got {len(frames)} frames")
    topic, seq, payload = frames
    return RawMessage(bytes(topic), decode_seq(seq), bytes(payload))


def replay_request(start_seq: int) -> list[bytes]:
    """The frames a DEALER sends to ask for every buffered batch with seq >= start_seq."""
    return [b"", encode_seq(start_seq)]


def parse_replay(frames: Sequence[bytes]) -> RawMessage | None:
    """A replay reply as a RawMessage; None for the end marker."""
    if len(frames) < 3 or frames[0] != b"":
        raise FrameError(f"expected [b'', (topic,) seq, payload], got {len(frames)} frames")
    if len(frames) == 4:
        _, topic, seq, payload = frames
    elif len(frames) == 3:
        (_, seq, payload), topic = frames, b""
    else:
        raise FrameError(f"expected 3 or 4 replay frames, got {len(frames)}")
    if seq == END_SEQ:
        return None
    return RawMessage(bytes(topic), decode_seq(seq), bytes(payload))
