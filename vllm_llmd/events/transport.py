"""The sockets a `Subscriber` and a `ReplayClient` read through, chosen by name.

Both hand over whole messages as lists of frames, each message within `max_frames` frames and
`max_message_bytes` bytes:

- "zmq" (pyzmq's SUB and DEALER): libzmq drops a peer whose frame is over the bound
  (ZMQ_MAXMSGSIZE) and `recv_bounded` drains a message too big in all, but libzmq buffers an
  unfinished multipart message without limit, so a publisher that never sends a last frame grows
  the process until it dies.
- "zmtp" (`zmtp.ZmtpConnection`, our own client): every bound is checked before a byte is kept;
  a peer that breaks one is cut (counted through `on_cut`, logged), then reconnected with backoff.
  It speaks ZMTP's NULL security only.

With `curve` keys (`curve.CurveClientKeys`), pyzmq's sockets are CURVE clients: the stream is
encrypted and only a publisher holding the pods' secret key is heard, so the one risk of the
"zmq" transport (a publisher that never ends a message) comes from trusted peers only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol

import zmq
from zmq.utils.monitor import recv_monitor_message

from vllm_llmd.events.curve import CurveClientKeys
from vllm_llmd.events.wire import (
    LIVE_FRAMES,
    REPLAY_FRAMES,
    FrameError,
    limit_frame_size,
    recv_bounded,
)
from vllm_llmd.events.zmtp import ZmtpConnection
from vllm_llmd.events.zmtp_codec import MessageBounds

Transport = Literal["zmq", "zmtp"]
TRANSPORTS: tuple[Transport, ...] = ("zmq", "zmtp")


class LiveSocket(Protocol):
    """A SUB connection to one publisher."""

    @property
    def closed(self) -> bool: ...

    @property
    def subscribed(self) -> bool:
        """The subscription is on its way to the publisher: what it publishes from now on
        comes here (a replay asked for earlier could miss some)."""
        ...

    def wait(self, timeout: float) -> bool:
        """True once a message can be read, waiting at most `timeout` seconds."""
        ...

    def recv(self) -> list[bytes] | None:
        """A waiting message (None: none waits); FrameError for one too big, already drained."""
        ...

    def reconnect_if_dropped(self) -> bool:
        """True if the connection was lost since the last call (it is being made again)."""
        ...

    def close(self) -> None: ...


class RequestSocket(Protocol):
    """A DEALER connection to one replay endpoint."""

    def send(self, frames: list[bytes]) -> bool:
        """Queue one request; False if it cannot be sent."""
        ...

    def recv(self, timeout: float) -> list[bytes] | None:
        """The next reply within `timeout` seconds, else None; FrameError for a bad one."""
        ...

    def close(self) -> None: ...


def check_transport(transport: str, curve: CurveClientKeys | None = None) -> None:
    if transport not in TRANSPORTS:
        raise ValueError(f"transport {transport!r}: one of {', '.join(TRANSPORTS)}")
    if curve is not None and transport != "zmq":
        raise ValueError(
            f"transport {transport!r} speaks ZMTP's NULL security only: CURVE keys need "
            "transport 'zmq'"
        )


def open_live(
    transport: str,
    endpoint: str,
    *,
    topic: bytes,
    max_message_bytes: int,
    context: zmq.Context[zmq.Socket[bytes]] | None = None,
    name: str | None = None,
    on_cut: Callable[[], None] | None = None,
    curve: CurveClientKeys | None = None,
) -> LiveSocket:
    """A SUB on `endpoint` subscribed to the `topic` prefix (ValueError for a bad endpoint)."""
    check_transport(transport, curve)
    if transport == "zmtp":
        bounds = MessageBounds(LIVE_FRAMES, max_message_bytes)
        return ZmtpLive(
            ZmtpConnection(endpoint, "SUB", bounds, subscribe=topic, name=name, on_cut=on_cut)
        )
    return ZmqLive(endpoint, topic, max_message_bytes, context or zmq.Context.instance(), curve)


def open_request(
    transport: str,
    endpoint: str,
    *,
    max_message_bytes: int,
    context: zmq.Context[zmq.Socket[bytes]] | None = None,
    name: str | None = None,
    on_cut: Callable[[], None] | None = None,
    curve: CurveClientKeys | None = None,
) -> RequestSocket:
    """A DEALER on a replay endpoint."""
    check_transport(transport, curve)
    if transport == "zmtp":
        bounds = MessageBounds(REPLAY_FRAMES, max_message_bytes)
        connection = ZmtpConnection(
            endpoint, "DEALER", bounds, auto_reconnect=False, name=name, on_cut=on_cut
        )
        return ZmtpRequest(connection)
    return ZmqRequest(endpoint, max_message_bytes, context or zmq.Context.instance(), curve)


# ---- pyzmq ---------------------------------------------------------------------------------------


class ZmqLive:
    def __init__(
        self,
        endpoint: str,
        topic: bytes,
        max_message_bytes: int,
        context: zmq.Context[zmq.Socket[bytes]],
        curve: CurveClientKeys | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._curve = curve
        self._topic = topic
        self._max_message_bytes = max_message_bytes
        self._context = context
        # from the monitor: handshakes finished, and a disconnect not yet acted on
        self._handshakes = 0
        self._disconnected = False
        self._sub, self._monitor = self._connect()

    def _connect(self) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
        sub = self._context.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        # match the publisher's default HWM so a slow poller does not drop (it would then replay)
        sub.setsockopt(zmq.RCVHWM, 100_000)
        sub.setsockopt(zmq.SUBSCRIBE, self._topic)
        limit_frame_size(sub, self._max_message_bytes)
        if self._curve is not None:
            self._curve.apply(sub)
        # Watch the connection: libzmq's SUB reconnects to a restarted publisher but then
        # receives nothing (seen with pyzmq 27 / libzmq 4.3), so a disconnect means a new socket;
        # a finished handshake means the subscription is on its way (libzmq sends it next).
        monitor = sub.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        try:
            sub.connect(self._endpoint)
        except zmq.ZMQError:
            sub.disable_monitor()
            monitor.close(linger=0)
            sub.close(linger=0)
            raise
        return sub, monitor

    @property
    def closed(self) -> bool:
        return bool(self._sub.closed)

    @property
    def subscribed(self) -> bool:
        if not self._handshakes:
            self._read_monitor()
        return self._handshakes > 0

    def wait(self, timeout: float) -> bool:
        return bool(self._sub.poll(int(timeout * 1000)))

    def recv(self) -> list[bytes] | None:
        try:
            return recv_bounded(self._sub, LIVE_FRAMES, self._max_message_bytes, zmq.NOBLOCK)
        except zmq.Again:
            return None

    def reconnect_if_dropped(self) -> bool:
        self._read_monitor()
        dropped, self._disconnected = self._disconnected, False
        if dropped:
            self.close()
            self._handshakes = 0
            self._sub, self._monitor = self._connect()
        return dropped

    def _read_monitor(self) -> None:
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            self._disconnected |= event == zmq.EVENT_DISCONNECTED
            self._handshakes += event == zmq.EVENT_HANDSHAKE_SUCCEEDED

    def close(self) -> None:
        if not self._sub.closed:
            self._sub.disable_monitor()
            self._monitor.close(linger=0)
            self._sub.close(linger=0)


class ZmqRequest:
    def __init__(
        self,
        endpoint: str,
        max_message_bytes: int,
        context: zmq.Context[zmq.Socket[bytes]],
        curve: CurveClientKeys | None = None,
    ) -> None:
        self._max_message_bytes = max_message_bytes
        self._socket = context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        limit_frame_size(self._socket, max_message_bytes)
        if curve is not None:
            curve.apply(self._socket)
        self._socket.connect(endpoint)

    def send(self, frames: list[bytes]) -> bool:
        try:
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:  # no pipe to the publisher (yet)
            return False
        return True

    def recv(self, timeout: float) -> list[bytes] | None:
        if not self._socket.poll(int(timeout * 1000)):
            return None
        return recv_bounded(self._socket, REPLAY_FRAMES, self._max_message_bytes)

    def close(self) -> None:
        self._socket.close(linger=0)


# ---- our ZMTP client -----------------------------------------------------------------------------


class ZmtpLive:
    def __init__(self, connection: ZmtpConnection) -> None:
        self.connection = connection
        self._waiting: list[bytes] | None = None  # read by wait(), not yet by recv()

    @property
    def closed(self) -> bool:
        return self.connection.closed

    @property
    def subscribed(self) -> bool:
        return self.connection.subscribed

    def wait(self, timeout: float) -> bool:
        if self._waiting is None:
            self._waiting = self.connection.recv(timeout)
        return self._waiting is not None

    def recv(self) -> list[bytes] | None:
        message, self._waiting = self._waiting, None
        return message if message is not None else self.connection.recv(0.0)

    def reconnect_if_dropped(self) -> bool:
        return self.connection.take_dropped()  # it reconnects by itself, with backoff

    def close(self) -> None:
        self._waiting = None
        self.connection.close()


class ZmtpRequest:
    def __init__(self, connection: ZmtpConnection) -> None:
        self.connection = connection

    def send(self, frames: list[bytes]) -> bool:
        self.connection.send(frames)
        return True

    def recv(self, timeout: float) -> list[bytes] | None:
        num_cut = self.connection.num_cut
        message = self.connection.recv(timeout)
        if self.connection.num_cut != num_cut:
            raise FrameError(f"connection cut: {self.connection.last_cut_reason}")
        return message

    def close(self) -> None:
        self.connection.close()
