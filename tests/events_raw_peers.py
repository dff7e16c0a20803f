"""ZMTP peers on raw TCP sockets, for what libzmq will not send: a publisher that never ends a
message, oversized or too many frames, a broken greeting, a 3.0 publisher, PINGs.

A `RawServer` listens on a free port and runs a script per accepted connection on its thread.
The scripts speak ZMTP with the bytes written out here (the server side of a handshake), so a
test of our client does not lean only on our own codec for what the peer sends.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

ZMTP_GREETING_30 = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + bytes(32)
ZMTP_GREETING_31 = ZMTP_GREETING_30[:11] + b"\x01" + ZMTP_GREETING_30[12:]


def frame(body: bytes, *, more: bool = False, command: bool = False) -> bytes:
    flags = (1 if more else 0) | (4 if command else 0)
    if len(body) > 255:
        return bytes([flags | 2]) + len(body).to_bytes(8, "big") + body
    return bytes([flags, len(body)]) + body


def command(name: bytes, data: bytes = b"") -> bytes:
    return frame(bytes([len(name)]) + name + data, command=True)


def ready(socket_type: bytes) -> bytes:
    return command(b"READY", b"\x0bSocket-Type" + len(socket_type).to_bytes(4, "big") + socket_type)


def message(*frames: bytes) -> bytes:
    return b"".join(frame(f, more=i < len(frames) - 1) for i, f in enumerate(frames))


def recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the client closed the connection")
        data += chunk
    return data


def read_frame(conn: socket.socket) -> tuple[int, bytes]:
    """(flags, body) of the next frame the client sends."""
    flags = recv_exactly(conn, 1)[0]
    size_bytes = recv_exactly(conn, 8 if flags & 2 else 1)
    return flags, recv_exactly(conn, int.from_bytes(size_bytes, "big"))


def handshake(conn: socket.socket, socket_type: bytes = b"PUB", minor: int = 1) -> bytes:
    """Greet (ZMTP 3.`minor`), exchange READYs; returns the client's READY body."""
    conn.sendall(ZMTP_GREETING_31 if minor else ZMTP_GREETING_30)
    theirs = recv_exactly(conn, 64)
    assert theirs[0] == 0xFF and theirs[9] == 0x7F and theirs[10] == 3, theirs
    assert theirs[12:16] == b"NULL", theirs
    conn.sendall(ready(socket_type))
    flags, body = read_frame(conn)
    assert flags == 4 and body.startswith(b"\x05READY"), (flags, body)
    return body


def read_subscription(conn: socket.socket) -> tuple[int, bytes]:
    """The client's subscription frame: (flags, body) (a command to 3.1, a message to 3.0)."""
    return read_frame(conn)


Script = Callable[[socket.socket, threading.Event], None]


class RawServer:
    """A TCP listener on a free port that runs `script(conn, stop)` per connection, in turn."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.stop = threading.Event()
        self.num_connections = 0
        self.errors: list[BaseException] = []
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.num_connections += 1
            with conn:
                try:
                    self.script(conn, self.stop)
                except (ConnectionError, BrokenPipeError, TimeoutError):
                    pass  # the client cut the connection: what most scripts wait for
                except BaseException as exc:  # an assertion of the script: the test reports it
                    self.errors.append(exc)

    def close(self) -> None:
        self.stop.set()
        self._thread.join(10)
        with contextlib.suppress(OSError):
            self._listener.close()
