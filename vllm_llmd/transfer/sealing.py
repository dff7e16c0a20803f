"""Sealed connections of the side channel with TLS on: a mutual TLS 1.3 handshake, then every
byte either way in AES-256-GCM records of up to 1 MiB under keys agreed inside that session.

Why not TLS for the bytes too: Python's `ssl` moves them one 16 KiB record at a time, each a
trip through OpenSSL's record layer with the GIL handed back and forth. Measured here (10 MiB
of KV per pull, `benchmarks/README.md`), that cost a P/D decode +15 to +32 ms on ~40 ms.
AES-256-GCM itself runs at about 10 GB/s on these CPUs (`cryptography`, which releases the GIL
as it works): as fast as the copy it replaces on the receiving side.

The connection, in order (the client is the decode worker):

1. a mutual TLS 1.3 handshake (`tls.py`'s contexts; the peer's certificate must chain to the
   deployment's CA, both ways): a peer without one is refused before it sends anything else;
2. inside that TLS session, one `KeyShare` frame each way (the client's first): 32 random
   bytes from each side. TLS protects them (secret and authenticated); both sides derive, by
   HKDF-SHA256 over the two shares, one key per direction (`derive_keys`), so neither side can
   force the keys of a connection, and no key serves two connections;
3. from then on, every frame of `framing.py` (header, control part, data part) travels in
   sealed records; the TLS session is not used again:

       ciphertext length (u32, tag included) | AES-256-GCM(plaintext) | 16-byte tag

   The nonce of a record is its number in its direction (0, 1, ...): a record replayed,
   dropped, reordered or cut fails the tag of the record where that happens, and the
   connection closes. A reader refuses a length over its bound before reading the record.
   Records are boundaries of nothing: a frame may span records, a record may hold frames.

Why HKDF over shares sent inside TLS rather than TLS's own exporter: Python's `ssl` does not
offer `export_keying_material`. The shares are as secret as anything TLS carries.

This module is the record layer and the key shares; the decode side's connection is a
`sealed_stream.SealedStream` (blocking, with a deadline), the prefill side's a
`sealed_socket.SealedSocket` (non-blocking, driven by `listener.py`'s selector loop, with
SSLSocket's conventions: `do_handshake`, `recv`, `send`, `pending`, and SSLWantRead/WriteError).
"""

from __future__ import annotations

import os
import ssl
import struct
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vllm_llmd.transfer import messages as wire
from vllm_llmd.transfer.framing import HEADER, parse_header

# ciphertext bytes that follow a record header (its plaintext plus the tag)
RECORD_HEADER = struct.Struct("!I")
TAG_BYTES = 16
# a record's plaintext, at most: large enough that a 10 MiB reply is ten records (ten tags,
# ten record headers), small enough that a record's ciphertext stays in cache while it is read
MAX_RECORD_PLAINTEXT = 1 << 20
# what a prefill worker accepts in one record from a decode worker: requests are small; this
# bounds what each connection holds before its tag is checked
MAX_REQUEST_RECORD_PLAINTEXT = 64 << 10
# raw bytes read from the socket at once during the TLS handshake, either side
TLS_READ_BYTES = 1 << 16
_NONCE = struct.Struct("!IQ")  # 4 zero bytes, then the record's number in its direction
# a direction is closed long before its record number could wrap (2**64)
_MAX_RECORDS = 1 << 48
_KDF_INFO = b"vllm-llmd side channel sealing v1"
# the key share frame: header and a msgpack control part of ~60 bytes
_MAX_KEY_SHARE_CONTROL = 256


class SealError(ConnectionError):
    """A sealed connection broke its protocol (a record failed its tag, a length over the
    bound, a bad key share): the connection is closed."""


class KeyShareRefused(ConnectionError):
    """The prefill worker answered the key share with an error (its side channel failed, or
    it does not seal: an older vllm-llmd)."""

    def __init__(self, reply: wire.TransferError) -> None:
        super().__init__(f"({reply.code}): {reply.message}")
        self.reply = reply


def derive_keys(client_share: bytes, server_share: bytes) -> tuple[bytes, bytes]:
    """(client-to-server key, server-to-client key) of one connection."""
    material = HKDF(algorithm=hashes.SHA256(), length=64, salt=None, info=_KDF_INFO).derive(
        client_share + server_share
    )
    return material[:32], material[32:]


class _Direction:
    """One direction's key and record count."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._records = 0

    def _nonce(self) -> bytes:
        if self._records >= _MAX_RECORDS:
            raise SealError("a sealed connection ran out of record numbers")
        nonce = _NONCE.pack(0, self._records)
        self._records += 1
        return nonce


class Sealer(_Direction):
    def seal_into(self, plaintext: memoryview, out: memoryview) -> int:
        """Write plaintext (MAX_RECORD_PLAINTEXT at most) as one record at out's start;
        returns the record's bytes."""
        length = len(plaintext) + TAG_BYTES
        RECORD_HEADER.pack_into(out, 0, length)
        end = RECORD_HEADER.size + length
        self._aead.encrypt_into(self._nonce(), plaintext, None, out[RECORD_HEADER.size : end])
        return end


class Opener(_Direction):
    def open_into(self, ciphertext: memoryview, out: memoryview) -> int:
        """Decrypt one record's ciphertext (tag included) into out; returns its plaintext
        bytes. SealError if the tag fails (out is then zeroed, never half-written)."""
        plaintext = len(ciphertext) - TAG_BYTES
        try:
            self._aead.decrypt_into(self._nonce(), ciphertext, None, out[:plaintext])
        except InvalidTag:
            raise SealError("a sealed record failed authentication") from None
        return plaintext


def record_length(header: bytes | bytearray | memoryview, max_plaintext: int) -> int:
    length: int = RECORD_HEADER.unpack(header)[0]
    if not TAG_BYTES <= length <= max_plaintext + TAG_BYTES:
        raise SealError(
            f"a sealed record of {length} bytes (at most {max_plaintext + TAG_BYTES} allowed)"
        )
    return length


def new_key_share() -> wire.KeyShare:
    return wire.KeyShare(version=wire.PROTOCOL_VERSION, share=os.urandom(wire.KEY_SHARE_BYTES))


def read_key_share_frame(
    tls: ssl.SSLObject, received: bytearray, fill: Callable[[], None]
) -> bytes:
    """The control part of the key share frame read through tls into received (kept across
    calls by a non-blocking caller); fill() brings more TLS bytes or raises."""
    while True:
        need = HEADER.size
        if len(received) >= HEADER.size:
            try:
                control_bytes, _ = parse_header(received[: HEADER.size], max_data_bytes=0)
            except wire.WireError as exc:
                raise SealError(f"not a key share frame: {exc}") from None
            if not 0 < control_bytes <= _MAX_KEY_SHARE_CONTROL:
                raise SealError(f"a frame of {control_bytes} bytes where a key share belongs")
            need += control_bytes
            if len(received) == need:
                return bytes(received[HEADER.size :])
        try:
            received += tls.read(need - len(received))
        except ssl.SSLWantReadError:
            fill()
