"""Byte framing of the side channel over TCP, bounded before anything is buffered.

Every message, either way, is one frame:

    "LLMD" | protocol version (u16) | control length (u32) | data length (u64) | control | data

the control part a msgpack message of `messages.py`, the data part (BlocksHeader replies only)
raw block bytes. Why not ZMQ: libzmq buffers a multipart message whole before handing it over,
and its only size option (ZMQ_MAXMSGSIZE) bounds one frame, so a peer that sends frames with
MORE set and never a last one grows the receiver without limit. Here a receiver reads the
fixed header first and refuses any length over its bound before reading the rest; the data part
goes straight into a buffer of exactly the announced size.
"""

from __future__ import annotations

import struct
import time
from typing import Protocol

from vllm_llmd.transfer.messages import (
    MAX_CONTROL_BYTES,
    PROTOCOL_VERSION,
    KeyShare,
    Reply,
    Request,
    WireError,
    encode,
)

HEADER = struct.Struct("!4sHIQ")
MAGIC = b"LLMD"
# recv_into sets the socket's timeout to what is left before the deadline at most this often:
# a wait may end this much past the deadline
_TIMEOUT_REFRESH_S = 0.005
# what a ZMQ peer (protocol v1) sends first: the ZMTP signature starts 0xFF and ends 0x7F
_ZMTP_FIRST_BYTE = 0xFF


class Stream(Protocol):
    """What the receiving helpers use of a blocking socket (or a `sealed_stream.SealedStream`)."""

    def settimeout(self, timeout: float | None) -> None: ...

    def recv_into(self, buffer: memoryview) -> int: ...


class ConnectionClosed(ConnectionError):
    """The peer closed the connection; `received` bytes of the frame had arrived."""

    def __init__(self, received: int) -> None:
        super().__init__(f"connection closed after {received} bytes of a frame")
        self.received = received


def frame_header(control_bytes: int, data_bytes: int = 0) -> bytes:
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, control_bytes, data_bytes)


def parse_header(header: bytes | bytearray | memoryview, max_data_bytes: int) -> tuple[int, int]:
    """(control length, data length) of a frame header; WireError names what is wrong."""
    magic, version, control_bytes, data_bytes = HEADER.unpack(header)
    if magic != MAGIC:
        if header[0] == _ZMTP_FIRST_BYTE:
            raise WireError(
                "the peer speaks ZMQ (LLMD transfer protocol v1), this side v"
                f"{PROTOCOL_VERSION} over TCP: run the same vllm-llmd version on both sides"
            )
        raise WireError(f"not an LLMD side-channel frame (starts {bytes(header[:4])!r})")
    if version != PROTOCOL_VERSION:
        raise WireError(
            f"peer speaks LLMD transfer protocol v{version}, this side v{PROTOCOL_VERSION}"
        )
    if control_bytes > MAX_CONTROL_BYTES:
        raise WireError(f"control part of {control_bytes} bytes exceeds {MAX_CONTROL_BYTES}")
    if data_bytes > max_data_bytes:
        raise WireError(f"data part of {data_bytes} bytes exceeds the {max_data_bytes} allowed")
    return control_bytes, data_bytes


def recv_into(sock: Stream, view: memoryview, deadline: float) -> None:
    """Fill view from a blocking socket by time.monotonic() `deadline` (TimeoutError after,
    within _TIMEOUT_REFRESH_S); ConnectionClosed if the peer closes first."""
    received = 0
    refresh_at = 0.0
    while received < len(view):
        # Each settimeout is a syscall that also releases the GIL, and a TLS socket returns one
        # 16 KiB record per call (640 per 10 MiB): refresh the timeout only now and then.
        now = time.monotonic()
        if now >= refresh_at:
            sock.settimeout(max(0.001, deadline - now))
            refresh_at = now + _TIMEOUT_REFRESH_S
        count = sock.recv_into(view[received:])
        if count == 0:
            raise ConnectionClosed(received)
        received += count


def recv_exactly(sock: Stream, nbytes: int, deadline: float) -> bytearray:
    buffer = bytearray(nbytes)
    recv_into(sock, memoryview(buffer), deadline)
    return buffer


def frame(message: Request | Reply | KeyShare, data_bytes: int = 0) -> bytes:
    """Header and control part of one frame (its data part, if any, is sent after it)."""
    control = encode(message)
    return frame_header(len(control), data_bytes) + control
