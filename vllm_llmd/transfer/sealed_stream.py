"""The decode side's sealed connection to a prefill worker (`sealing.py` says what it is)."""

from __future__ import annotations

import socket
import ssl
import threading
import time

from vllm_llmd.transfer import messages as wire
from vllm_llmd.transfer.framing import frame, recv_into
from vllm_llmd.transfer.sealing import (
    MAX_RECORD_PLAINTEXT,
    RECORD_HEADER,
    TAG_BYTES,
    TLS_READ_BYTES,
    KeyShareRefused,
    Opener,
    Sealer,
    SealError,
    derive_keys,
    new_key_share,
    read_key_share_frame,
    record_length,
)

# what "no timeout" waits at most for a record's bytes (framing's helpers need a deadline)
_NO_TIMEOUT_S = 24 * 3600.0

_local = threading.local()


def _receive_scratch() -> memoryview:
    """This thread's buffer for one record's ciphertext (a thread reads one reply at a time)."""
    scratch = _local.__dict__.get("scratch")
    if scratch is None:
        scratch = _local.scratch = memoryview(bytearray(MAX_RECORD_PLAINTEXT + TAG_BYTES))
    return scratch


def _deadline_after(timeout: float | None) -> float:
    return time.monotonic() + (_NO_TIMEOUT_S if timeout is None else timeout)


class SealedStream:
    """The decode side's sealed connection over a connected blocking socket (module doc).
    Offers what `channel.Channel` uses of a socket: settimeout, sendall, recv_into, close."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_hostname: str) -> None:
        """The TLS handshake and the key shares, within sock's timeout: ssl.SSLError, OSError,
        SealError or KeyShareRefused if either fails, sock then closed."""
        self._sock = sock
        self._deadline = _deadline_after(sock.gettimeout())
        self._plaintext = memoryview(b"")  # decrypted and not yet read
        self._header = bytearray(RECORD_HEADER.size)
        try:
            client_share = new_key_share()
            reply = _exchange_key_shares(sock, context, server_hostname, client_share)
            send_key, receive_key = derive_keys(client_share.share, reply.share)
        except BaseException:
            sock.close()
            raise
        self._sealer = Sealer(send_key)
        self._opener = Opener(receive_key)

    def settimeout(self, timeout: float | None) -> None:
        """Every read until the next call ends by now + timeout (a deadline, as framing's
        helpers use it: one record takes several socket reads)."""
        self._deadline = _deadline_after(timeout)
        self._sock.settimeout(timeout)

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        size = RECORD_HEADER.size + min(len(view), MAX_RECORD_PLAINTEXT) + TAG_BYTES
        out = memoryview(bytearray(size))
        for start in range(0, len(view), MAX_RECORD_PLAINTEXT):
            piece = view[start : start + MAX_RECORD_PLAINTEXT]
            self._sock.sendall(out[: self._sealer.seal_into(piece, out)])

    def recv_into(self, buffer: memoryview) -> int:
        """Up to len(buffer) bytes (one record's at most); 0 if the peer closed between
        records. A record at least as large as buffer is decrypted straight into it."""
        if not self._plaintext:
            header = memoryview(self._header)
            first = self._sock.recv_into(header)
            if first == 0:
                return 0
            recv_into(self._sock, header[first:], self._deadline)
            length = record_length(header, MAX_RECORD_PLAINTEXT)
            scratch = _receive_scratch()[:length]
            recv_into(self._sock, scratch, self._deadline)
            if length - TAG_BYTES <= len(buffer):
                return self._opener.open_into(scratch, buffer)
            plaintext = memoryview(bytearray(length - TAG_BYTES))
            self._opener.open_into(scratch, plaintext)
            self._plaintext = plaintext
        count = min(len(buffer), len(self._plaintext))
        buffer[:count] = self._plaintext[:count]
        self._plaintext = self._plaintext[count:]
        return count

    def close(self) -> None:
        self._sock.close()


def _exchange_key_shares(
    sock: socket.socket, context: ssl.SSLContext, server_hostname: str, share: wire.KeyShare
) -> wire.KeyShare:
    """The client's steps 1 and 2 (module doc) through memory BIOs over sock: the server's
    share. Nothing of the sealed stream that follows is read: the server sends its first
    record only after our first."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    buffer = bytearray(TLS_READ_BYTES)

    def fill() -> None:
        if outgoing.pending:
            sock.sendall(outgoing.read())
        count = sock.recv_into(buffer)
        if count == 0:
            raise ssl.SSLEOFError("the peer closed the connection in the TLS handshake")
        incoming.write(buffer[:count])

    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            fill()
    tls.write(frame(share))
    sock.sendall(outgoing.read())
    received = read_key_share_frame(tls, bytearray(), fill)
    if tls.pending() or incoming.pending:
        raise SealError("the prefill worker sent more than its key share")
    reply = wire.decode_key_share(received)
    if isinstance(reply, wire.TransferError):
        raise KeyShareRefused(reply)
    return reply
