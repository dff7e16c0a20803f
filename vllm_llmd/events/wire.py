"""Frames of vLLM's ZmqEventPublisher, as raw messages: transport only, no decoding.

PUB socket, one multipart message per engine step that had events:

    [topic, seq (8-byte big-endian unsigned), payload (msgpack KVEventBatch)]

`seq` counts from 0 per publisher process, so it restarts at 0 when the engine restarts.

Replay ROUTER socket, as a DEALER client sees it:

    request   [b"", start_seq (8 bytes)]
    replies   [b"", topic, seq, payload]   one per buffered batch with seq >= start_seq
              [b"", seq, payload]          (older vLLM: no topic frame)
    end       [b"", b"", END_SEQ, b""]     END_SEQ is -1 as 8 signed bytes (0xFF * 8)

Size bounds. ZMQ_MAXMSGSIZE (`limit_frame_size`) bounds each frame: libzmq drops the connection
of a peer that sends a bigger one. It does not bound a multipart message: libzmq delivers one
only whole, so a peer that sends frames with MORE set and never a last one makes it buffer
without limit, and no socket option prevents that (the "zmtp" transport, zmtp.py, does). What
arrives whole, `recv_bounded` reads frame by frame, keeping at most the frames and bytes the
format allows and draining the rest, so Python never holds an oversized message.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import zmq

END_SEQ = (-1).to_bytes(8, "big", signed=True)


# Bytes one published message (all its frames) may have. vLLM's biggest batches hold the token
# ids of a long prefill (a few bytes per token): far below this.
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
# frames of a live message, and of the longest replay reply
LIVE_FRAMES = 3
REPLAY_FRAMES = 4


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


def limit_frame_size(socket: zmq.Socket[bytes], max_bytes: int) -> None:
    """Make libzmq drop a peer that sends a frame over `max_bytes` (before it is buffered)."""
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
    socket.setsockopt(zmq.MAXMSGSIZE, max_bytes)


def recv_bounded(
    socket: zmq.Socket[bytes], max_frames: int, max_bytes: int, flags: int = 0
) -> list[bytes]:
    """One multipart message, frame by frame: FrameError if it has more than `max_frames` frames
    or more than `max_bytes` in all (the whole message is consumed; the excess is never kept).

    Raises zmq.Again (with zmq.NOBLOCK) when no message is waiting.
    """
    frames: list[bytes] = []
    num_frames = num_bytes = 0
    more = True
    while more:
        # the first frame may wait (flags); the rest of a message is already there
        frame = socket.recv(flags if num_frames == 0 else 0, copy=False)
        more = bool(frame.more)
        num_frames += 1
        num_bytes += len(frame)
        if num_frames <= max_frames and num_bytes <= max_bytes:
            frames.append(frame.bytes)
        else:
            frames.clear()  # drained, not kept
    if num_frames > max_frames or num_bytes > max_bytes:
        raise FrameError(
            f"a message of {num_frames} frames and {num_bytes} bytes: at most {max_frames} "
            f"frames and {max_bytes} bytes are allowed"
        )
    return frames
