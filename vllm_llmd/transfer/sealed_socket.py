"""The prefill side's sealed connection, driven by `listener.py` (`sealing.py` says what it
is)."""

from __future__ import annotations

import collections
import socket
import ssl

from vllm_llmd.transfer import messages as wire
from vllm_llmd.transfer.framing import frame
from vllm_llmd.transfer.sealing import (
    MAX_RECORD_PLAINTEXT,
    MAX_REQUEST_RECORD_PLAINTEXT,
    RECORD_HEADER,
    TAG_BYTES,
    TLS_READ_BYTES,
    Opener,
    Sealer,
    SealError,
    derive_keys,
    new_key_share,
    read_key_share_frame,
    record_length,
)

# spare send buffers of connections between replies (SealedSocket.release_buffers)
_SPARE_SEND_BUFFERS: collections.deque[bytearray] = collections.deque(maxlen=4)

_HANDSHAKE, _KEY_SHARE, _SEALED = "handshake", "key_share", "sealed"


class SealedSocket:
    """The prefill side's sealed connection over an accepted socket (module doc): the calls
    and errors of a non-blocking `ssl.SSLSocket`, so `listener.py` drives either alike.

    Bounded: before its tag is checked, a connection holds one record of at most
    MAX_REQUEST_RECORD_PLAINTEXT (`held_bytes`); one reply record of up to
    MAX_RECORD_PLAINTEXT is being sent at a time.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        self._sock = sock
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls: ssl.SSLObject | None = context.wrap_bio(
            self._incoming, self._outgoing, server_side=True
        )
        self._state = _HANDSHAKE
        self._key_share = bytearray()  # the client's key share frame as it arrives
        self._sealer: Sealer | None = None
        self._opener: Opener | None = None
        # raw bytes to send before anything else: handshake output, or a record's unsent tail
        self._unsent = memoryview(b"")
        self._unsent_plaintext = 0  # plaintext bytes of that record (what send reports)
        self._send_buffer: bytearray | None = None
        # the record being read: its header, then its ciphertext
        self._record = bytearray(RECORD_HEADER.size)
        self._record_received = 0
        self._plaintext = memoryview(b"")  # decrypted and not yet read

    # -- what the listener calls ------------------------------------------------------------

    def fileno(self) -> int:
        return self._sock.fileno()

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self._sock.setsockopt(level, option, value)

    def getsockopt(self, level: int, option: int) -> int:
        return self._sock.getsockopt(level, option)

    def close(self) -> None:
        self._sock.close()
        self.release_buffers()

    def do_handshake(self, refusal: bytes | None = None) -> None:
        """Advance steps 1 and 2; return once the keys are agreed and all said is sent.
        ssl.SSLWantReadError / SSLWantWriteError: call again when the socket is ready;
        ssl.SSLError / OSError (SealError included): the peer is refused.
        refusal: a frame to answer the key share with instead (then SealError)."""
        if not self._send_unsent():
            raise ssl.SSLWantWriteError("handshake output waits")
        while self._state != _SEALED:
            assert self._tls is not None
            if self._state == _HANDSHAKE:
                self._step_tls_handshake()
                continue
            client_share = self._read_key_share()
            if refusal is not None:
                self._tls.write(refusal)
                self._queue_tls_output()
                self._send_unsent()
                raise SealError("refused at the key share")
            server_share = new_key_share()
            self._tls.write(frame(server_share))
            self._queue_tls_output()
            receive_key, send_key = derive_keys(client_share.share, server_share.share)
            self._opener, self._sealer = Opener(receive_key), Sealer(send_key)
            self._tls = None  # never used again
            self._state = _SEALED
        if not self._send_unsent():
            raise ssl.SSLWantWriteError("the key share waits")

    def pending(self) -> int:
        """Plaintext bytes decrypted and not read yet."""
        return len(self._plaintext)

    def held_bytes(self) -> int:
        """Bytes this connection holds of what its peer sent (a record's, plaintext's)."""
        return len(self._record) - RECORD_HEADER.size + len(self._plaintext)

    def recv(self, nbytes: int) -> bytes:
        """Up to nbytes of plaintext; b"" once the peer closed between records.
        BlockingIOError: no whole record yet; SealError: the connection broke its rules."""
        assert self._opener is not None, "recv before the handshake"
        while not self._plaintext:
            if self._record_received == len(self._record) > RECORD_HEADER.size:
                ciphertext = memoryview(self._record)[RECORD_HEADER.size :]
                plaintext = memoryview(bytearray(len(ciphertext) - TAG_BYTES))
                self._opener.open_into(ciphertext, plaintext)
                self._plaintext = plaintext
                self._record = bytearray(RECORD_HEADER.size)
                self._record_received = 0
                break
            # BlockingIOError when nothing came: the listener waits for the socket
            count = self._sock.recv_into(memoryview(self._record)[self._record_received :])
            if count == 0:
                if self._record_received:
                    raise SealError("the peer closed the connection inside a record")
                return b""
            self._record_received += count
            if self._record_received == RECORD_HEADER.size == len(self._record):
                length = record_length(self._record, MAX_REQUEST_RECORD_PLAINTEXT)
                self._record += bytes(length)
        data = bytes(self._plaintext[:nbytes])
        self._plaintext = self._plaintext[nbytes:]
        return data

    def send(self, data: memoryview) -> int:
        """Seal the start of data (MAX_RECORD_PLAINTEXT at most) as one record and send it;
        returns the plaintext bytes it took. ssl.SSLWantWriteError: a record is partly sent;
        call again with the same data (as with an SSLSocket) once the socket can take more."""
        assert self._sealer is not None, "send before the handshake"
        if not self._unsent:
            if self._send_buffer is None:
                try:
                    self._send_buffer = _SPARE_SEND_BUFFERS.pop()
                except IndexError:
                    size = RECORD_HEADER.size + MAX_RECORD_PLAINTEXT + TAG_BYTES
                    self._send_buffer = bytearray(size)
            piece = data[:MAX_RECORD_PLAINTEXT]
            out = memoryview(self._send_buffer)
            self._unsent = out[: self._sealer.seal_into(piece, out)]
            self._unsent_plaintext = len(piece)
        if not self._send_unsent():
            raise ssl.SSLWantWriteError("a sealed record is partly sent")
        return self._unsent_plaintext

    def release_buffers(self) -> None:
        """The reply is sent: lend the send buffer to the next connection that replies."""
        if self._send_buffer is not None and not self._unsent:
            _SPARE_SEND_BUFFERS.append(self._send_buffer)
            self._send_buffer = None

    # -- steps 1 and 2 ------------------------------------------------------------------------

    def _step_tls_handshake(self) -> None:
        """The TLS handshake as far as the bytes at hand take it (its end: _KEY_SHARE)."""
        assert self._tls is not None
        try:
            self._tls.do_handshake()
            self._state = _KEY_SHARE
            return
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError:  # the alert that says why goes to the peer if it can
            self._queue_tls_output()
            self._send_unsent()
            raise
        self._queue_tls_output()
        if not self._send_unsent():
            raise ssl.SSLWantWriteError("handshake output waits")
        self._fill_tls()

    def _fill_tls(self) -> None:
        """Raw bytes from the socket into the TLS object, or SSLWantReadError."""
        try:
            data = self._sock.recv(TLS_READ_BYTES)
        except BlockingIOError:
            raise ssl.SSLWantReadError("the handshake waits for the peer") from None
        if not data:
            raise ssl.SSLEOFError("the peer closed the connection in the TLS handshake")
        self._incoming.write(data)

    def _queue_tls_output(self) -> None:
        if self._outgoing.pending:
            self._unsent = memoryview(bytes(self._unsent) + self._outgoing.read())

    def _send_unsent(self) -> bool:
        """Send what waits; True once all of it is sent."""
        while self._unsent:
            try:
                sent = self._sock.send(self._unsent)
            except BlockingIOError:
                return False
            self._unsent = self._unsent[sent:]
        return True

    def _read_key_share(self) -> wire.KeyShare:
        """The client's KeyShare frame through TLS, or SSLWantReadError until it is whole."""
        assert self._tls is not None
        control = read_key_share_frame(self._tls, self._key_share, self._fill_tls)
        if self._tls.pending() or self._incoming.pending:
            raise SealError("the decode worker sent more than its key share")
        try:
            share = wire.decode_key_share(control)
        except wire.WireError as exc:
            raise SealError(
                f"no key share from the decode worker ({exc}): run the same vllm-llmd version "
                "on both sides"
            ) from None
        if not isinstance(share, wire.KeyShare):
            raise SealError(f"a {type(share).__name__} instead of a key share")
        return share
