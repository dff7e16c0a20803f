"""ZMTP 3.x on the wire (rfc.zeromq.org 23 and 37), NULL mechanism only, without I/O.

    greeting   0xFF, 8 bytes padding, 0x7F, major 3, minor, mechanism "NULL" (20 bytes),
               as-server (1 byte), 31 bytes filler: 64 bytes
    frame      flags (MORE 0x01, LONG 0x02, COMMAND 0x04), size (1 byte, or 8 bytes big-endian
               with LONG), body
    command    a COMMAND frame: name size (1 byte), name, data
    READY      data: properties, each name size (1 byte), name, value size (4 bytes), value

`FrameDecoder` checks every length against its bound when the header announces it, before a
byte of what it announces is kept: a frame over the bound, a message over its frame count or
byte total, a malformed command raise `ProtocolError` (the caller cuts the connection). So it
holds at most one message's bound plus what one read brought.
"""

from __future__ import annotations

from dataclasses import dataclass

GREETING_BYTES = 64
FLAG_MORE = 0x01
FLAG_LONG = 0x02
FLAG_COMMAND = 0x04
# A READY with libzmq's properties is under 100 bytes; a PING's context at most 16.
MAX_COMMAND_BYTES = 16 << 10
MAX_PING_CONTEXT_BYTES = 16

_MECHANISM_NULL = b"NULL".ljust(20, b"\x00")


class ProtocolError(ValueError):
    """The peer broke ZMTP or one of our bounds: its connection is cut."""


@dataclass(frozen=True)
class MessageBounds:
    """What one received message may hold (data frames only; commands have their own bound)."""

    max_frames: int
    max_message_bytes: int

    def __post_init__(self) -> None:
        if self.max_frames <= 0 or self.max_message_bytes <= 0:
            raise ValueError(f"message bounds must be > 0, got {self}")


@dataclass(frozen=True)
class Command:
    name: bytes
    data: bytes


def greeting(minor: int = 1) -> bytes:
    """Our greeting as a client: ZMTP 3.`minor`, NULL, not a server.

    The padding holds 1 as a 64-bit length, as libzmq sends it (a ZMTP 1.0 peer reads it).
    """
    return (
        b"\xff"
        + (1).to_bytes(8, "big")
        + b"\x7f"
        + bytes([3, minor])
        + _MECHANISM_NULL
        + b"\x00"
        + bytes(31)
    )


def check_greeting(data: bytes | bytearray) -> int | None:
    """Check what has come of the peer's greeting (checked as early as each byte allows).

    Returns the ZMTP minor version to speak once all 64 bytes are in, else None.
    """
    if len(data) >= 1 and data[0] != 0xFF:
        raise ProtocolError(f"not a ZMTP peer: its greeting starts {bytes(data[:10])!r}")
    if len(data) >= 10 and not data[9] & 0x01:
        raise ProtocolError("the peer speaks ZMTP 1.0; 3.0 or later is needed")
    if len(data) >= 11 and data[10] < 3:
        raise ProtocolError(f"the peer speaks ZMTP {data[10]}.x; 3.0 or later is needed")
    if len(data) < GREETING_BYTES:
        return None
    mechanism = bytes(data[12:32])
    if mechanism != _MECHANISM_NULL:
        name = mechanism.rstrip(b"\x00").decode("ascii", "replace")
        raise ProtocolError(f"the peer asks for security mechanism {name!r}; only NULL is spoken")
    # a newer major speaks 3.x to us (rfc 23); 3.0 and 3.1 differ in how SUB subscribes
    return data[11] if data[10] == 3 else 1


def encode_frame(body: bytes, *, more: bool = False, command: bool = False) -> bytes:
    flags = (FLAG_MORE if more else 0) | (FLAG_COMMAND if command else 0)
    if len(body) > 255:
        return bytes([flags | FLAG_LONG]) + len(body).to_bytes(8, "big") + body
    return bytes([flags, len(body)]) + body


def encode_message(frames: list[bytes]) -> bytes:
    last = len(frames) - 1
    return b"".join(encode_frame(f, more=i < last) for i, f in enumerate(frames))


def encode_command(name: bytes, data: bytes = b"") -> bytes:
    return encode_frame(bytes([len(name)]) + name + data, command=True)


def encode_ready(socket_type: str, identity: bytes | None = None) -> bytes:
    """READY with Socket-Type, and Identity (DEALER, REQ: libzmq sends it, empty by default)."""
    properties = [(b"Socket-Type", socket_type.encode())]
    if identity is not None:
        properties.append((b"Identity", identity))
    data = b"".join(
        bytes([len(name)]) + name + len(value).to_bytes(4, "big") + value
        for name, value in properties
    )
    return encode_command(b"READY", data)


def parse_properties(data: bytes) -> dict[str, bytes]:
    """The metadata of a READY command; ProtocolError if a length runs past the end."""
    properties: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        name_end = pos + 1 + data[pos]
        if name_end + 4 > len(data):
            raise ProtocolError("a READY property runs past the end of the command")
        value_end = name_end + 4 + int.from_bytes(data[name_end : name_end + 4], "big")
        if value_end > len(data):
            raise ProtocolError("a READY property value runs past the end of the command")
        name = data[pos + 1 : name_end].decode("ascii", "replace")
        properties[name.lower()] = bytes(data[name_end + 4 : value_end])
        pos = value_end
    return properties


def _parse_command(body: bytes) -> Command:
    if not body or len(body) < 1 + body[0]:
        raise ProtocolError("a command whose name runs past its frame")
    return Command(bytes(body[1 : 1 + body[0]]), bytes(body[1 + body[0] :]))


class FrameDecoder:
    """Bytes in, whole messages (lists of frames) and commands out; bounded (module docstring)."""

    def __init__(self, bounds: MessageBounds) -> None:
        self.bounds = bounds
        self._raw = b""  # received, not parsed yet: the rest of one read
        self._pos = 0
        # the frame being read: its flags, declared size and what has come of its body
        self._flags = 0
        self._size = -1  # -1: between frames
        self._body = bytearray()
        self._frames: list[bytes] = []  # earlier frames of the message being read
        self._frames_bytes = 0
        self._message_bytes = 0  # announced so far, the frame being read included

    @property
    def buffered_bytes(self) -> int:
        """Bytes held: unparsed input, the frame being read, the message's earlier frames."""
        return len(self._raw) - self._pos + len(self._body) + self._frames_bytes

    def feed(self, data: bytes) -> None:
        """Add received bytes (call when `next()` returned None: what is left is a header part)."""
        self._raw = self._raw[self._pos :] + data
        self._pos = 0

    def next(self) -> list[bytes] | Command | None:
        """The next whole message or command; None until more bytes are fed."""
        while True:
            if self._size < 0 and not self._read_header():
                return None
            take = min(self._size - len(self._body), len(self._raw) - self._pos)
            self._body += self._raw[self._pos : self._pos + take]
            self._pos += take
            if len(self._body) < self._size:
                return None
            body, self._body, self._size = bytes(self._body), bytearray(), -1
            if self._flags & FLAG_COMMAND:
                return _parse_command(body)
            self._frames.append(body)
            self._frames_bytes += len(body)
            if not self._flags & FLAG_MORE:
                message, self._frames = self._frames, []
                self._frames_bytes = self._message_bytes = 0
                return message

    def _read_header(self) -> bool:
        available = len(self._raw) - self._pos
        if available < 2:
            return False
        flags = self._raw[self._pos]
        if flags & ~(FLAG_MORE | FLAG_LONG | FLAG_COMMAND):
            raise ProtocolError(f"a frame with reserved flag bits set ({flags:#04x})")
        header = 9 if flags & FLAG_LONG else 2
        if available < header:
            return False
        size = int.from_bytes(self._raw[self._pos + 1 : self._pos + header], "big")
        self._check(flags, size)
        self._pos += header
        self._flags, self._size = flags, size
        if not flags & FLAG_COMMAND:
            self._message_bytes += size  # counted when announced: a bound is never overrun
        return True

    def _check(self, flags: int, size: int) -> None:
        bounds = self.bounds
        if flags & FLAG_COMMAND:
            if flags & FLAG_MORE:
                raise ProtocolError("a command frame with MORE set")
            if self._frames:
                raise ProtocolError("a command inside a multipart message")
            if size > MAX_COMMAND_BYTES:
                raise ProtocolError(f"a command of {size} bytes (at most {MAX_COMMAND_BYTES})")
            return
        if len(self._frames) >= bounds.max_frames:
            raise ProtocolError(f"a message of more than {bounds.max_frames} frames")
        if size > bounds.max_message_bytes:
            raise ProtocolError(
                f"a frame of {size} bytes (at most {bounds.max_message_bytes} per message)"
            )
        if self._message_bytes + size > bounds.max_message_bytes:
            raise ProtocolError(
                f"a message of more than {bounds.max_message_bytes} bytes "
                f"({len(self._frames) + 1} frames, {self._message_bytes + size} bytes announced)"
            )
