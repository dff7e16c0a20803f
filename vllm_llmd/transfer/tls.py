"""TLS contexts of the side channel (mutual TLS 1.3, Python's `ssl`): off unless configured.

Trust model: one private CA signs the certificates of the prefill and decode instances of one
deployment (`side_channel_tls_ca`); a peer is trusted when its certificate chains to that CA,
both ways (the prefill requires a client certificate, the decode verifies the prefill's). Host
names are not checked: pods are reached by IP addresses that change on every restart and are
carried in `kv_transfer_params`, so a certificate cannot name them; the CA itself is the pin.
Use a CA for this channel alone (not the cluster's), or every holder of a certificate it
signed can pull any transfer whose id it learns. A transfer id still scopes each read.

The contexts are built once per process and set of files (`functools.cache`): rotating the
files takes a restart. A file that cannot be read or is not PEM fails with ValueError naming
its `kv_connector_extra_config` key and path. The decode side's connections are `TlsStream`s
(memory BIOs over a plain socket), not `SSLSocket`s: see its doc for why.
"""

from __future__ import annotations

import functools
import socket
import ssl

# the config keys, for error messages
_KEYS = {
    "cert": "side_channel_tls_cert",
    "key": "side_channel_tls_key",
    "ca": "side_channel_tls_ca",
}
# what each file must hold, by the PEM label of its first block
_PEM_LABELS = {"cert": ("CERTIFICATE",), "key": ("PRIVATE KEY",), "ca": ("CERTIFICATE",)}


@functools.cache
def make_server_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """The prefill side's context: TLS 1.3, its certificate, a CA-signed client one required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.num_tickets = 0  # no session resumption: a decode keeps its connections open
    _configure(context, cert, key, ca)
    return context


@functools.cache
def make_client_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """The decode side's context: TLS 1.3, its certificate, the prefill's verified against ca
    (no host name check: see the module doc)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # CA-pinned: pods are addressed by changing IPs
    _configure(context, cert, key, ca)
    return context


def _configure(context: ssl.SSLContext, cert: str, key: str, ca: str) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    for role, path in (("cert", cert), ("key", key), ("ca", ca)):
        _check_pem(role, path)
    try:
        # password: never prompt on a terminal for an encrypted key (it fails instead)
        context.load_cert_chain(cert, key, password=_no_password)
    except (ssl.SSLError, ValueError) as exc:
        raise ValueError(
            f"LLMDConnector: side_channel_tls_cert {cert!r} and side_channel_tls_key {key!r} "
            f"are not a certificate and its unencrypted private key: {exc}"
        ) from None
    try:
        context.load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:
        raise ValueError(
            f"LLMDConnector: side_channel_tls_ca {ca!r} is not a PEM CA bundle: {exc}"
        ) from None


def _check_pem(role: str, path: str) -> None:
    """ValueError naming the key and path unless path is readable and holds the right PEM."""
    try:
        with open(path, "rb") as file:
            text = file.read(1 << 20)
    except OSError as exc:
        raise ValueError(
            f"LLMDConnector: kv_connector_extra_config[{_KEYS[role]!r}]: cannot read {path!r}: "
            f"{exc.strerror or exc}"
        ) from None
    labels = _PEM_LABELS[role]
    if not any(b"-----BEGIN " in text and label.encode() in text for label in labels):
        raise ValueError(
            f"LLMDConnector: kv_connector_extra_config[{_KEYS[role]!r}]: {path!r} is not a "
            f"PEM file with a {' or '.join(labels)} block"
        )


def _no_password() -> bytes:
    raise ValueError("the private key is encrypted; mount it unencrypted (a Secret)")


# ciphertext read from the socket at once by a TlsStream (16 TLS records; one buffer per
# connection)
_STREAM_READ_BYTES = 256 << 10


class TlsStream:
    """A client TLS connection whose records go through memory BIOs over a plain socket.

    Why not `SSLSocket`: each of its reads returns one record (16 KiB at most) after two
    syscalls (record header, then body) and with the GIL released around them, 1,280 syscalls
    per 10 MiB of KV; where the decode worker's core is shared and its main thread wants the
    GIL, every one is a chance to wait. Here the ciphertext comes in reads of up to
    _STREAM_READ_BYTES and each record is decrypted from memory. Offers what the side channel's
    client uses of a socket: settimeout, sendall, recv_into and close.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_hostname: str) -> None:
        """The handshake, within sock's timeout (the certificate of the peer is verified):
        ssl.SSLError or OSError if it fails, sock then closed."""
        self._sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(
            self._incoming, self._outgoing, server_hostname=server_hostname
        )
        self._buffer = memoryview(bytearray(_STREAM_READ_BYTES))
        try:
            while True:
                try:
                    self._tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self._flush()
                    if not self._fill():
                        raise ssl.SSLEOFError(
                            "the peer closed the connection in the TLS handshake"
                        ) from None
            self._flush()
        except BaseException:
            sock.close()
            raise

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def sendall(self, data: bytes) -> None:
        self._tls.write(data)
        self._flush()

    def recv_into(self, buffer: memoryview) -> int:
        """Up to len(buffer) bytes (one record's at most); 0 once the peer has closed."""
        while True:
            try:
                count = self._tls.read(len(buffer), buffer)
            except ssl.SSLWantReadError:
                if not self._fill():
                    return 0
                continue
            except ssl.SSLZeroReturnError:  # the peer's close_notify
                return 0
            if self._outgoing.pending:  # a post-handshake message to answer
                self._flush()
            return count

    def close(self) -> None:
        self._sock.close()

    def _fill(self) -> bool:
        """Ciphertext from the socket into the TLS object; False if the peer has closed."""
        count = self._sock.recv_into(self._buffer)
        if count == 0:
            return False
        self._incoming.write(self._buffer[:count])
        return True

    def _flush(self) -> None:
        if self._outgoing.pending:
            self._sock.sendall(self._outgoing.read())
