"""A minimal ZMTP 3.x client on one TCP connection: the SUB and DEALER roles, NULL security.

Why our own: libzmq keeps every frame of a multipart message until its last one arrives, without
limit, so a publisher that sends frames with MORE set and never a last one grows the router until
it dies (no socket option bounds a whole message). Here every length is checked before what it
announces is kept (`zmtp_codec.FrameDecoder`): a connection holds at most one read plus one
message's bound. A peer that breaks a bound or the protocol, or does not finish its handshake in
time, is cut: counted (`num_cut`, `on_cut`), logged (throttled, naming the endpoint), and
connected again after a backoff, where libzmq would have reconnected too.

Handshake as libzmq 4.3 does it: greeting (we offer 3.1), READY with Socket-Type (and an empty
Identity for a DEALER), the peer's READY checked for a compatible type. A SUB then subscribes with
a SUBSCRIBE command to a 3.1 peer and with a `\\x01 + topic` message to a 3.0 one, and filters on
its side too. PINGs are answered with PONGs (libzmq sends them only with ZMQ_HEARTBEAT_IVL set).

Single-threaded and non-blocking: all I/O happens inside `recv(timeout)`, which returns within
`timeout` seconds. Not thread-safe. Name resolution (getaddrinfo) is the one blocking call: give
IP addresses where a slow DNS must not stall the caller.
"""

from __future__ import annotations

import enum
import errno
import logging
import select
import socket
import time
from collections.abc import Callable

from vllm_llmd.events.zmtp_codec import (
    GREETING_BYTES,
    MAX_PING_CONTEXT_BYTES,
    Command,
    FrameDecoder,
    MessageBounds,
    ProtocolError,
    check_greeting,
    encode_command,
    encode_message,
    encode_ready,
    greeting,
    parse_properties,
)
from vllm_llmd.log import ThrottledLog

logger = logging.getLogger(__name__)

RECONNECT_IVL_S = 0.1  # libzmq's default ZMQ_RECONNECT_IVL
RECONNECT_IVL_MAX_S = 2.0  # doubling per failed attempt or cut connection, up to this
HANDSHAKE_TIMEOUT_S = 10.0  # connect, greeting and READY (libzmq's ZMQ_HANDSHAKE_IVL is 30)
READ_BYTES = 64 << 10  # one read
MAX_SEND_BUFFER_BYTES = 1 << 20  # our own output (PONGs, requests) a peer does not read
_CUT_LOG_INTERVAL_S = 10.0

# the peer socket types libzmq accepts for each of ours
COMPATIBLE_PEERS = {"SUB": {b"PUB", b"XPUB"}, "DEALER": {b"ROUTER", b"DEALER", b"REP"}}


class State(enum.Enum):
    DOWN = "down"  # no connection; the next attempt at `_retry_at`
    CONNECTING = "connecting"
    GREETING = "greeting"
    HANDSHAKE = "handshake"  # greetings exchanged; waiting for the peer's READY
    READY = "ready"
    CLOSED = "closed"


def parse_tcp_endpoint(endpoint: str) -> tuple[str, int]:
    """("host", port) of "tcp://host:port" (IPv6 as "tcp://[::1]:5557"); ValueError otherwise."""
    if not endpoint.startswith("tcp://"):
        raise ValueError(f"{endpoint!r}: the zmtp transport connects to tcp://host:port only")
    host, sep, port = endpoint[len("tcp://") :].rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{endpoint!r} is not tcp://host:port")
    return host, int(port)


class ZmtpConnection:
    """One client connection (SUB or DEALER) to `endpoint`, bounded as the module says."""

    def __init__(
        self,
        endpoint: str,
        socket_type: str,
        bounds: MessageBounds,
        *,
        subscribe: bytes | None = None,
        auto_reconnect: bool = True,
        name: str | None = None,
        on_cut: Callable[[], None] | None = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
    ) -> None:
        if socket_type not in COMPATIBLE_PEERS:
            raise ValueError(f"socket type {socket_type!r}: one of {sorted(COMPATIBLE_PEERS)}")
        if (subscribe is not None) != (socket_type == "SUB"):
            raise ValueError("a SUB connection needs `subscribe` (a topic prefix); others none")
        self.endpoint = endpoint
        self._address = parse_tcp_endpoint(endpoint)
        self.name = name or endpoint
        self.socket_type = socket_type
        self.bounds = bounds
        self.num_cut = 0
        self.num_connects = 0  # connections that reached READY
        self.last_cut_reason = ""
        self._subscribe = subscribe
        self._auto_reconnect = auto_reconnect
        self._on_cut = on_cut
        self._handshake_timeout = handshake_timeout
        self._log = ThrottledLog(logger, _CUT_LOG_INTERVAL_S)
        self._state = State.DOWN
        self._sock: socket.socket | None = None
        self._poller = select.poll()
        self._retry_at = 0.0  # the first attempt at once, as zmq's connect()
        self._handshake_deadline = 0.0
        self._failures = 0  # attempts in a row that failed or were cut: the backoff exponent
        self._dropped = False
        self._greeting = bytearray()
        self._peer_minor = 1
        self._decoder: FrameDecoder | None = None
        self._tx = bytearray()  # to send now
        self._flushed_since_ready = False  # see `subscribed`
        self._outbox = bytearray()  # messages sent before READY: they follow it
        if auto_reconnect:
            self._start_connect()

    # ---- public -------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def closed(self) -> bool:
        return self._state is State.CLOSED

    @property
    def subscribed(self) -> bool:
        """The connection is READY and everything queued by then (a SUB's subscription, a
        DEALER's early requests) has been handed to the kernel."""
        return self._flushed_since_ready

    @property
    def buffered_bytes(self) -> int:
        """Bytes this connection holds now (input not yet delivered, output not yet sent)."""
        decoder = self._decoder.buffered_bytes if self._decoder is not None else 0
        return len(self._greeting) + decoder + len(self._tx) + len(self._outbox)

    def take_dropped(self) -> bool:
        """True once after a connection that had reached READY was lost (or cut)."""
        dropped, self._dropped = self._dropped, False
        return dropped

    def send(self, frames: list[bytes]) -> None:
        """Queue one message (sent once the handshake is done); a DEALER connects if down."""
        if self._state is State.CLOSED:
            raise ValueError(f"{self.name}: the connection is closed")
        data = encode_message(frames)
        if len(self._outbox) + len(self._tx) + len(data) > MAX_SEND_BUFFER_BYTES:
            raise ValueError(f"{self.name}: more than {MAX_SEND_BUFFER_BYTES} bytes queued")
        (self._tx if self._state is State.READY else self._outbox).extend(data)
        if self._state is State.DOWN and not self._auto_reconnect:
            self._start_connect()

    def recv(self, timeout: float) -> list[bytes] | None:
        """The next whole message, waiting at most `timeout` seconds; None if none came."""
        deadline = time.monotonic() + max(timeout, 0.0)
        # past the deadline, keep reading only what is there, and not forever (a PING flood)
        read_budget = self.bounds.max_message_bytes + 2 * READ_BYTES
        while True:
            message = self._next_message()
            if message is not None:
                return message
            now = time.monotonic()
            if self._state is State.CLOSED:
                return None
            if self._state is State.DOWN:
                if not self._auto_reconnect:
                    return None
                if now >= self._retry_at:
                    self._start_connect()
                    continue
                if now >= deadline:
                    return None
                time.sleep(min(self._retry_at, deadline) - now)
                continue
            if self._state is not State.READY and now >= self._handshake_deadline:
                self._cut(f"no handshake within {self._handshake_timeout:g}s")
                continue
            wait_until = deadline
            if self._state is not State.READY:
                wait_until = min(deadline, self._handshake_deadline)
            num_read = self._io(max(0.0, wait_until - now))
            if num_read < 0 or time.monotonic() < deadline:
                continue
            read_budget -= num_read
            if num_read == 0 or read_budget <= 0:
                return None

    def close(self) -> None:
        """Release the socket. Idempotent."""
        self._close_socket()
        self._state = State.CLOSED

    # ---- connection state ---------------------------------------------------------------------

    def _start_connect(self) -> None:
        self._handshake_deadline = time.monotonic() + self._handshake_timeout
        host, port = self._address
        # IPv4 unless the endpoint is an IPv6 address (libzmq resolves IPv4 only, by default)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                host, port, family, socket.SOCK_STREAM
            )[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            self._attempt_failed(f"cannot resolve or open a socket: {exc}")
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._poller.register(sock.fileno(), select.POLLOUT)
        code = sock.connect_ex(address)
        if code not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            self._attempt_failed(f"connect: {errno.errorcode.get(code, code)}")
            return
        self._state = State.CONNECTING

    def _connected(self) -> None:
        assert self._sock is not None
        code = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._attempt_failed(f"connect: {errno.errorcode.get(code, code)}")
            return
        self._state = State.GREETING
        self._tx.extend(greeting())

    def _on_greeting(self, data: bytes) -> None:
        need = GREETING_BYTES - len(self._greeting)
        self._greeting.extend(data[:need])
        minor = check_greeting(self._greeting)
        if minor is None:
            return
        self._peer_minor = minor
        self._greeting.clear()
        self._state = State.HANDSHAKE
        self._decoder = FrameDecoder(self.bounds)
        identity = b"" if self.socket_type == "DEALER" else None
        self._tx.extend(encode_ready(self.socket_type, identity))
        self._decoder.feed(data[need:])

    def _on_ready(self, command: Command) -> None:
        peer_type = parse_properties(command.data).get("socket-type", b"")
        if peer_type not in COMPATIBLE_PEERS[self.socket_type]:
            raise ProtocolError(
                f"the peer is a {peer_type.decode('ascii', 'replace') or 'untyped'} socket; "
                f"a {self.socket_type} talks to {sorted(COMPATIBLE_PEERS[self.socket_type])}"
            )
        self._state = State.READY
        self.num_connects += 1
        if self._subscribe is not None:
            if self._peer_minor >= 1:
                self._tx.extend(encode_command(b"SUBSCRIBE", self._subscribe))
            else:
                self._tx.extend(encode_message([b"\x01" + self._subscribe]))
        self._tx.extend(self._outbox)
        self._outbox.clear()

    def _on_command(self, command: Command) -> None:
        if command.name == b"ERROR":
            reason = command.data[1 : 1 + command.data[0]] if command.data else b""
            raise ProtocolError(f"the peer sent ERROR {reason.decode('ascii', 'replace')!r}")
        if self._state is State.HANDSHAKE:
            if command.name != b"READY":
                raise ProtocolError(f"a {command.name!r} command before READY")
            self._on_ready(command)
        elif command.name == b"READY":
            raise ProtocolError("a second READY")
        elif command.name == b"PING":
            context = command.data[2:]
            if len(command.data) < 2 or len(context) > MAX_PING_CONTEXT_BYTES:
                raise ProtocolError(f"a malformed PING ({len(command.data)} bytes)")
            if len(self._tx) + len(context) > MAX_SEND_BUFFER_BYTES:
                raise ProtocolError("the peer sends PINGs and does not read the PONGs")
            self._tx.extend(encode_command(b"PONG", context))
        # PONG and commands of newer versions: nothing to do (rfc 37 lets a peer ignore them)

    def _next_message(self) -> list[bytes] | None:
        try:
            while self._decoder is not None:
                item = self._decoder.next()
                if item is None:
                    return None
                if isinstance(item, Command):
                    self._on_command(item)
                elif self._state is not State.READY:
                    raise ProtocolError("a message before the handshake")
                elif self._subscribe is None or item[0].startswith(self._subscribe):
                    return item
        except ProtocolError as exc:
            self._cut(str(exc))
        return None

    # ---- I/O ----------------------------------------------------------------------------------

    def _io(self, wait: float) -> int:
        """One poll of the socket: bytes read (0: nothing happened; -1: the state changed)."""
        assert self._sock is not None
        fd = self._sock.fileno()
        connecting = self._state is State.CONNECTING
        mask = select.POLLOUT if connecting else select.POLLIN
        if self._tx and not connecting:
            mask |= select.POLLOUT
        self._poller.modify(fd, mask)
        events = self._poller.poll(int(wait * 1000 + 0.999))
        if not events:
            return 0
        revents = events[0][1]
        if connecting:
            self._connected()
            return -1
        try:
            if revents & select.POLLOUT and self._tx:
                del self._tx[: self._sock.send(self._tx)]
                self._flushed_since_ready |= self._state is State.READY and not self._tx
            if not revents & (select.POLLIN | select.POLLHUP | select.POLLERR):
                return -1
            data = self._sock.recv(READ_BYTES)
        except BlockingIOError:
            return -1
        except OSError as exc:
            self._lost(f"{exc}")
            return -1
        if not data:
            self._lost("closed by the peer")
            return -1
        try:
            if self._state is State.GREETING:
                self._on_greeting(data)
            else:
                assert self._decoder is not None
                self._decoder.feed(data)
        except ProtocolError as exc:
            self._cut(str(exc))
            return -1
        return len(data)

    def _cut(self, reason: str) -> None:
        """The peer broke a bound or the protocol: count, log, drop, back off."""
        self.num_cut += 1
        self.last_cut_reason = reason
        if self._on_cut is not None:
            self._on_cut()
        self._failures += 1
        delay = self._drop()
        self._log.warning(
            "%s: cut the connection to %s: %s (%d cut so far); reconnecting in %.1fs",
            self.name,
            self.endpoint,
            reason,
            self.num_cut,
            delay,
        )

    def _lost(self, reason: str) -> None:
        """The connection ended (peer gone, reset): reconnect as libzmq would."""
        if self._state is State.READY:
            self._failures = 0  # a good connection ended: retry soon
        else:
            self._failures += 1
        logger.debug("%s: connection to %s lost: %s", self.name, self.endpoint, reason)
        self._drop()

    def _attempt_failed(self, reason: str) -> None:
        self._failures += 1
        delay = self._drop()
        logger.debug("%s: %s: %s; next attempt in %.1fs", self.name, self.endpoint, reason, delay)

    def _drop(self) -> float:
        """Close the socket, forget what it held; the delay before the next attempt."""
        self._dropped |= self._state is State.READY
        self._flushed_since_ready = False
        self._close_socket()
        self._state = State.DOWN
        delay = min(RECONNECT_IVL_S * 2.0 ** min(self._failures, 16), RECONNECT_IVL_MAX_S)
        self._retry_at = time.monotonic() + delay
        return delay

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._poller.unregister(self._sock.fileno())
            self._sock.close()
            self._sock = None
        self._decoder = None
        self._greeting.clear()
        self._tx.clear()
        self._outbox.clear()
