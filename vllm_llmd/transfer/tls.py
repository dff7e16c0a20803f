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
its `kv_connector_extra_config` key and path. The handshake is all TLS does on the side channel:
the bytes after it travel sealed under keys agreed inside it (`sealing.py` says why).
"""

from __future__ import annotations

import functools
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
