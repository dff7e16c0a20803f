"""CURVE (ZMQ's authenticated encryption) on the KV-event streams: keys, and the sockets' options.

A pod's events name the block hashes of every prompt it served, so whoever reads them learns
which prefixes were asked for, and whoever can publish in a pod's place steers the router's
index. Off by default; turned on with key files a Kubernetes Secret can mount, made by pyzmq:

    python -c "import zmq.auth; zmq.auth.create_certificates('keys', 'pods')"    # the pods'
    python -c "import zmq.auth; zmq.auth.create_certificates('keys', 'router')"  # a reader's

Each call writes `NAME.key` (the public key) and `NAME.key_secret` (both keys).

- The publisher (vLLM's own, in the pod, wrapped by `connector/curve_publisher.py`) reads
  its secret certificate from `VLLM_LLMD_KV_EVENTS_CURVE_SECRET_KEY`, and the public
  certificates of the readers it admits from the folder `VLLM_LLMD_KV_EVENTS_CURVE_CLIENTS`.
  Without that folder it admits any reader that knows its public key (the traffic is still
  encrypted, and only the holder of its secret key can publish under it).
- A reader (the router, `vllm-llmd-events`) gives its own secret certificate and the pods'
  public one. A reader without the pods' public key cannot finish the handshake, and one whose
  key is not in the admitted folder is refused by the publisher's ZAP handler; either way
  before any event is sent.

All pods may share one key pair (one Secret), as they share one role.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth

SECRET_KEY_ENV = "VLLM_LLMD_KV_EVENTS_CURVE_SECRET_KEY"
CLIENTS_ENV = "VLLM_LLMD_KV_EVENTS_CURVE_CLIENTS"


class CurveKeyError(ValueError):
    """A CURVE key file or folder that cannot be used; the message names it."""


def _load(path: str | os.PathLike[str], what: str, need_secret: bool) -> tuple[bytes, bytes]:
    """(public, secret) of a zmq.auth certificate file; secret is b"" when not needed."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CurveKeyError(
            f"{what} {str(path)!r} is not a readable ZMQ certificate ({exc}); make one with "
            "zmq.auth.create_certificates (see vllm_llmd/events/curve.py)"
        ) from None
    if need_secret and not secret:
        raise CurveKeyError(
            f"{what} {str(path)!r} holds no secret key: give the NAME.key_secret file, not NAME.key"
        )
    for key in (public, secret or b""):
        if key and len(key) != 40:  # Z85 of 32 bytes
            raise CurveKeyError(f"{what} {str(path)!r}: a key is not 40 Z85 characters")
    return public, secret or b""


@dataclass(frozen=True)
class CurveClientKeys:
    """A reader's keys: its own pair, and the publishers' public key."""

    public: bytes
    secret: bytes = field(repr=False)
    server_public: bytes

    @classmethod
    def load(
        cls, secret_key_file: str | os.PathLike[str], server_key_file: str | os.PathLike[str]
    ) -> CurveClientKeys:
        public, secret = _load(secret_key_file, "CURVE secret key", need_secret=True)
        server_public, _ = _load(server_key_file, "the pods' CURVE public key", False)
        return cls(public, secret, server_public)

    def apply(self, socket: zmq.Socket[bytes]) -> None:
        """Make `socket` a CURVE client; before it connects."""
        socket.curve_publickey = self.public
        socket.curve_secretkey = self.secret
        socket.curve_serverkey = self.server_public


@dataclass(frozen=True)
class CurveServerKeys:
    """A publisher's key pair, and the folder of the readers it admits (None: any reader)."""

    public: bytes
    secret: bytes = field(repr=False)
    clients_dir: Path | None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CurveServerKeys | None:
        """The keys the environment names; None when CURVE is off (no secret key named)."""
        environ = os.environ if environ is None else environ
        secret_file = environ.get(SECRET_KEY_ENV, "")
        clients = environ.get(CLIENTS_ENV, "")
        if not secret_file:
            if clients:
                raise CurveKeyError(f"{CLIENTS_ENV} is set but {SECRET_KEY_ENV} is not")
            return None
        public, secret = _load(secret_file, SECRET_KEY_ENV, need_secret=True)
        clients_dir = None
        if clients:
            clients_dir = Path(clients)
            if not clients_dir.is_dir():
                raise CurveKeyError(f"{CLIENTS_ENV} {clients!r} is not a folder")
            if not zmq.auth.load_certificates(clients_dir):
                raise CurveKeyError(
                    f"{CLIENTS_ENV} {clients!r} holds no public certificate (NAME.key): "
                    "no reader could connect"
                )
        return cls(public, secret, clients_dir)

    def apply(self, socket: zmq.Socket[bytes]) -> None:
        """Make `socket` a CURVE server; before it binds."""
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_server = True
