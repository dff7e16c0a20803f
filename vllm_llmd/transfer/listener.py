"""The prefill side's TCP loop of the side channel: connections, bounded frames, timeouts.

One thread, one selector, every socket non-blocking; `TransferServer` supplies what to answer.
Whatever a peer sends, what the loop holds for it is bounded before it is read:

- a request frame's header is read first and its lengths checked (`framing.parse_header`:
  control part at most `MAX_CONTROL_BYTES`, no data part), then only the announced bytes;
- all connections' partial requests together hold at most `max_buffered_bytes`, and one must
  be complete within `request_timeout_s` of its first byte;
- a connection is read only while no reply of its own is pending (one request at a time, as
  the protocol goes), and a reply that makes no progress for `send_timeout_s` closes it;
- at most `max_connections` are open: a new one replaces the least recently active idle one.

With TLS (`tls.py`: a server context given), every accepted socket is a
`sealed_socket.SealedSocket`: it first completes a mutual TLS handshake and the key shares,
driven by the same loop and bounded by `request_timeout_s`; a peer that fails them (no
certificate, another CA, plain TCP, no key share) is closed and logged (throttled) before a
byte of a request is read. Then every byte is sealed. A SealedSocket may hold decrypted bytes
that no select reports (`pending()`): the loop reads those before it waits again; the bytes it
holds of a record not yet authenticated count in `max_buffered_bytes`.

A peer that breaks a rule gets an error frame (when it can be named) and is disconnected. An
exception answering one request answers that peer with an error; anything else that goes wrong
with one connection closes it. Should the loop itself fail, it is logged with its traceback and
the port answers every later peer at once with `unavailable`, so pulls fail fast instead of
waiting out their timeout.
"""

from __future__ import annotations

import selectors
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from vllm_llmd.log import ThrottledLog, get_logger
from vllm_llmd.transfer import messages as wire
from vllm_llmd.transfer.failed_port import refuse_every_peer
from vllm_llmd.transfer.framing import HEADER, frame, parse_header
from vllm_llmd.transfer.sealed_socket import SealedSocket
from vllm_llmd.transfer.sealing import SealError

logger = get_logger(__name__)

# handle(peer, control part) -> the reply: header and control (framing.frame), then its data
# part if any (a buffer the loop sends without copying; kept referenced until sent)
Handler = Callable[[bytes, bytes], list[bytes | memoryview]]
# forget(peer): its connection is gone
Forget = Callable[[bytes], None]

_RECV_BYTES = 1 << 16
# Linux only (elsewhere replies go out as written)
_CORK: int | None = getattr(socket, "TCP_CORK", None)
# a non-blocking socket that cannot make progress now (plain TCP, or sealed wanting either way)
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class _Connection:
    __slots__ = (
        "corked",
        "frame_bytes",
        "handshaking",
        "inbox",
        "outbox",
        "peer",
        "progress_at",
        "sealed_held",
        "sock",
        "started_at",
    )

    def __init__(self, sock: socket.socket | SealedSocket, peer: bytes, now: float) -> None:
        self.sock = sock
        self.peer = peer
        # TLS: the handshake is not done yet (nothing is read until it is)
        self.handshaking = isinstance(sock, SealedSocket)
        self.inbox = bytearray()
        # what the SealedSocket held of the peer's bytes at the last read (in buffered_bytes)
        self.sealed_held = 0
        # header + control bytes of the request being read, once its header is in
        self.frame_bytes = 0
        self.started_at = now  # of the request being read (or of the TLS handshake)
        # reply parts still to send (memoryviews), and when a byte of them last went out
        self.outbox: list[memoryview] = []
        self.progress_at = now
        self.corked = False  # TCP_CORK on while a reply with a data part goes out


class FrameServer:
    """Accepts side-channel connections on host:port and answers their frames (module doc)."""

    def __init__(
        self,
        host: str,
        port: int,
        handle: Handler,
        forget: Forget,
        *,
        max_connections: int = 256,
        max_buffered_bytes: int = 16 << 20,
        request_timeout_s: float = 10.0,
        send_timeout_s: float = 60.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._handle = handle
        self._forget = forget
        self.max_connections = max_connections
        self.max_buffered_bytes = max_buffered_bytes
        self.request_timeout_s = request_timeout_s
        self.send_timeout_s = send_timeout_s
        self._tls = tls
        self._refused_log = ThrottledLog(logger)
        # peers refused at the TLS handshake (for tests and logs)
        self.tls_refused = 0
        bind_host = "" if host in ("*", "0.0.0.0") else host
        family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
        self._listener = socket.create_server((bind_host, port), family=family, backlog=128)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        # least recently active first
        self._connections: OrderedDict[bytes, _Connection] = OrderedDict()
        self._next_peer = 0
        # bytes of partial requests held now, and the most ever held (for tests and logs)
        self.buffered_bytes = 0
        self.max_buffered_seen = 0
        # why the loop failed (then every peer is answered `unavailable`), else None
        self.failure: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, name="llmd-transfer-server", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    # ---- the loop --------------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                for key, events in self._selector.select(timeout=0.1):
                    if key.data is None:
                        self._accept()
                    else:
                        self._service(key.data, events)
                self._expire(time.monotonic())
        except Exception as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            logger.error(
                "LLMD side channel on port %d failed; every peer is refused from now on",
                self.port,
                exc_info=True,
            )
            self._close_all()
            refuse_every_peer(self._listener, self._tls, self.failure, self._stop)
        finally:
            self._close_all()
            self._selector.close()
            self._listener.close()

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        if len(self._connections) >= self.max_connections and not self._evict_idle():
            logger.warning(
                "LLMD side channel: %d connections, none idle: refused a new one",
                len(self._connections),
            )
            sock.close()
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connected: socket.socket | SealedSocket = sock
        if self._tls is not None:
            connected = SealedSocket(sock, self._tls)
        self._next_peer += 1
        peer = b"peer-%d" % self._next_peer
        connection = _Connection(connected, peer, time.monotonic())
        self._connections[connection.peer] = connection
        self._selector.register(sock, selectors.EVENT_READ, connection)

    def _evict_idle(self) -> bool:
        """Close the least recently active idle connection, one still in its TLS handshake
        first (not yet a peer); False if none is idle."""
        idle = [c for c in self._connections.values() if not c.inbox and not c.outbox]
        for connection in sorted(idle, key=lambda c: not c.handshaking):
            self._close(connection)
            return True
        return False

    def _service(self, connection: _Connection, events: int) -> None:
        try:
            if connection.handshaking:
                self._handshake(connection)
            elif events & selectors.EVENT_WRITE:
                self._flush(connection)
            elif events & selectors.EVENT_READ:
                self._read(connection)
            while self._pending(connection):
                self._read(connection)
        except SealError as exc:  # an altered or forged record: worth an operator's look
            self._refused_log.warning("LLMD side channel: closed a sealed connection: %s", exc)
            self._close(connection)
        except OSError:  # reset by the peer, and the like: it is gone
            self._close(connection)
        except Exception:
            logger.exception("LLMD side channel: dropped a connection after an unexpected error")
            self._close(connection)

    def _expire(self, now: float) -> None:
        for connection in list(self._connections.values()):
            if connection.outbox and now - connection.progress_at > self.send_timeout_s:
                logger.warning(
                    "LLMD side channel: a peer read nothing of its reply for %.0fs: closed",
                    self.send_timeout_s,
                )
                self._close(connection)
            elif connection.handshaking and now - connection.started_at > self.request_timeout_s:
                self._refuse_tls(connection, f"no TLS handshake in {self.request_timeout_s:g}s")
            elif connection.inbox and now - connection.started_at > self.request_timeout_s:
                logger.warning(
                    "LLMD side channel: a peer sent %d bytes of a request in %.0fs: closed",
                    len(connection.inbox),
                    self.request_timeout_s,
                )
                self._close(connection)

    # ---- one connection ----------------------------------------------------------------------

    def _handshake(self, connection: _Connection) -> None:
        """One step of the TLS handshake and key shares; a peer that fails them is closed
        before any read."""
        sock = connection.sock
        assert isinstance(sock, SealedSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._selector.modify(sock, selectors.EVENT_READ, connection)
            return
        except ssl.SSLWantWriteError:
            self._selector.modify(sock, selectors.EVENT_WRITE, connection)
            return
        except (ssl.SSLError, OSError) as exc:
            self._refuse_tls(connection, getattr(exc, "reason", None) or str(exc))
            return
        connection.handshaking = False
        self._selector.modify(sock, selectors.EVENT_READ, connection)

    def _refuse_tls(self, connection: _Connection, reason: str) -> None:
        self.tls_refused += 1
        self._refused_log.warning(
            "LLMD side channel: refused a peer at the TLS handshake (%s); only peers with a "
            "certificate signed by side_channel_tls_ca may pull",
            reason,
        )
        self._close(connection)

    def _pending(self, connection: _Connection) -> bool:
        """Sealed: decrypted request bytes wait inside the SealedSocket, where select cannot
        see them, and this connection is reading (no reply of its own pending)."""
        sock = connection.sock
        return (
            isinstance(sock, SealedSocket)
            and not connection.handshaking
            and not connection.outbox
            and connection.peer in self._connections
            and sock.pending() > 0
        )

    def _read(self, connection: _Connection) -> None:
        inbox = connection.inbox
        want = (connection.frame_bytes or HEADER.size) - len(inbox)
        try:
            chunk = connection.sock.recv(min(want, _RECV_BYTES))
        except _WOULD_BLOCK:  # sealed: a record not whole yet
            chunk = None
        finally:
            self._count_sealed(connection)
        if chunk is None:
            if self.buffered_bytes > self.max_buffered_bytes:
                self._close_overfull(connection)
            return
        if not chunk:
            self._close(connection)
            return
        if self.buffered_bytes + len(chunk) > self.max_buffered_bytes:
            self._close_overfull(connection)
            return
        if not inbox:
            connection.started_at = time.monotonic()
        inbox += chunk
        self.buffered_bytes += len(chunk)
        self.max_buffered_seen = max(self.max_buffered_seen, self.buffered_bytes)
        if not connection.frame_bytes and len(inbox) == HEADER.size:
            try:
                control_bytes, _ = parse_header(inbox, max_data_bytes=0)
            except wire.WireError as exc:
                self._refuse(connection, str(exc))
                return
            connection.frame_bytes = HEADER.size + control_bytes
        if connection.frame_bytes and len(inbox) == connection.frame_bytes:
            control = bytes(inbox[HEADER.size :])
            self._take_inbox(connection)
            self._reply(connection, self._answer(connection.peer, control))

    def _count_sealed(self, connection: _Connection) -> None:
        """Bring buffered_bytes up to date with what a SealedSocket holds of its peer's bytes."""
        sock = connection.sock
        if isinstance(sock, SealedSocket):
            held = sock.held_bytes()
            self.buffered_bytes += held - connection.sealed_held
            connection.sealed_held = held
            self.max_buffered_seen = max(self.max_buffered_seen, self.buffered_bytes)

    def _close_overfull(self, connection: _Connection) -> None:
        logger.warning(
            "LLMD side channel: partial requests hold %d bytes: closed the peer sending more",
            self.buffered_bytes,
        )
        self._close(connection)

    def _answer(self, peer: bytes, control: bytes) -> list[bytes | memoryview]:
        try:
            return self._handle(peer, control)
        except Exception as exc:  # never let one request take the loop down
            logger.exception("LLMD side channel: a request failed")
            return [frame(wire.error("", wire.BAD_REQUEST, f"internal error: {exc}"))]

    def _refuse(self, connection: _Connection, reason: str) -> None:
        """Answer a frame that breaks the protocol with an error, then disconnect."""
        logger.warning("LLMD side channel: refused a malformed request: %s", reason)
        self._take_inbox(connection)
        try:
            connection.sock.send(memoryview(frame(wire.error("", wire.BAD_REQUEST, reason))))
        except OSError:
            pass
        self._close(connection)

    def _reply(self, connection: _Connection, parts: list[bytes | memoryview]) -> None:
        connection.outbox = [memoryview(part).cast("B") for part in parts]
        connection.progress_at = time.monotonic()
        if len(parts) > 1 and _CORK is not None:
            # A data part goes out in full segments, not each write pushed alone under
            # TCP_NODELAY (the header's small record, the end of each sealed record); the flush
            # that ends the reply uncorks: the tail goes at once.
            connection.sock.setsockopt(socket.IPPROTO_TCP, _CORK, 1)
            connection.corked = True
        self._selector.modify(connection.sock, selectors.EVENT_WRITE, connection)
        self._flush(connection)

    def _flush(self, connection: _Connection) -> None:
        outbox = connection.outbox
        while outbox:
            try:
                sent = connection.sock.send(outbox[0])
            except _WOULD_BLOCK:  # sealed: retries the same bytes; outbox[0] stays as it is
                return
            connection.progress_at = time.monotonic()
            if sent == len(outbox[0]):
                outbox.pop(0).release()
            else:
                outbox[0] = outbox[0][sent:]
        if connection.corked:
            assert _CORK is not None
            connection.sock.setsockopt(socket.IPPROTO_TCP, _CORK, 0)
            connection.corked = False
        if isinstance(connection.sock, SealedSocket):
            connection.sock.release_buffers()
        self._connections.move_to_end(connection.peer)
        self._selector.modify(connection.sock, selectors.EVENT_READ, connection)

    def _take_inbox(self, connection: _Connection) -> None:
        self.buffered_bytes -= len(connection.inbox)
        connection.inbox = bytearray()
        connection.frame_bytes = 0

    def _close(self, connection: _Connection) -> None:
        if self._connections.pop(connection.peer, None) is None:
            return
        self._take_inbox(connection)
        self.buffered_bytes -= connection.sealed_held
        connection.sealed_held = 0
        connection.outbox.clear()
        try:
            self._selector.unregister(connection.sock)
        except (KeyError, ValueError):
            pass
        connection.sock.close()
        self._forget(connection.peer)

    def _close_all(self) -> None:
        for connection in list(self._connections.values()):
            try:
                self._close(connection)
            except Exception:
                logger.exception("LLMD side channel: closing a connection failed")
