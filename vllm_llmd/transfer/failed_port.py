"""A side-channel port whose loop failed (`listener.py`): every new peer is told so at once."""

from __future__ import annotations

import select
import socket
import ssl
import threading

from vllm_llmd.log import get_logger
from vllm_llmd.transfer import messages as wire
from vllm_llmd.transfer.framing import frame
from vllm_llmd.transfer.sealed_socket import SealedSocket

logger = get_logger(__name__)

_RECV_BYTES = 1 << 16


def refuse_every_peer(
    listener: socket.socket, tls: ssl.SSLContext | None, failure: str, stop: threading.Event
) -> None:
    """Until stop: answer each new peer `unavailable`, naming failure, so that pulls fail
    fast instead of waiting out their timeout. With TLS, a peer that passes the handshake
    gets the refusal as the answer to its key share."""
    reason = f"the prefill worker's side channel failed: {failure}"
    refusal = frame(wire.error("", wire.UNAVAILABLE, reason))
    try:
        while not stop.is_set():
            readable, _, _ = select.select([listener], [], [], 0.1)
            if not readable:
                continue
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                continue
            try:
                sock.settimeout(0.5)
                if tls is not None:
                    SealedSocket(sock, tls).do_handshake(refusal=refusal)
                else:
                    sock.recv(_RECV_BYTES)  # its request: closing then resets nothing
                    sock.sendall(refusal)
            except OSError:
                pass
            finally:
                sock.close()
    except Exception:
        logger.exception("LLMD side channel: refusing peers failed too; the port closes")
