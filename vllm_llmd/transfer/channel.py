"""The decode side's connections to prefill workers: one request, one reply, every wait
bounded (`Channel.ask`), reused per pulling thread and endpoint (`channel_for`), dropped after
any failure (`discard`). A reply's data part lands in the thread's receive buffer
(`receive_buffer`), which its next read reuses. The pull protocol on top is `client.py`.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time

import torch

from vllm_llmd.transfer import messages as wire
from vllm_llmd.transfer.framing import (
    HEADER,
    ConnectionClosed,
    frame,
    parse_header,
    recv_exactly,
    recv_into,
)
from vllm_llmd.transfer.sealed_stream import SealedStream
from vllm_llmd.transfer.sealing import KeyShareRefused

# between connection tries (and, in client.py, between asks for a transfer the prefill has
# not registered yet)
RETRY_SLEEP_S = 0.05
_MAX_CHANNELS_PER_THREAD = 64
_NOT_SEALING = (
    " (a prefill worker that does not seal its side channel: run the same vllm-llmd version on "
    "both sides)"
)


class TransferFailed(RuntimeError):
    """A pull that did not complete; the message says why."""


class Channel:
    """A TCP connection to one prefill worker: one request, one reply, every wait bounded."""

    def __init__(self, endpoint: str, timeout_s: float, tls: ssl.SSLContext | None) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.tls = tls
        self.address = address_of(endpoint)
        self.sock: socket.socket | SealedStream | None = None

    def ask(
        self, request: wire.Request, max_data_bytes: int = 0, pinned: bool = False
    ) -> tuple[wire.Reply, torch.Tensor | None]:
        """The reply, and its data part (at most max_data_bytes) if it has one, in this
        thread's receive buffer (`receive_buffer`: valid until its next ask). Any failure
        closes the connection (the next ask opens a new one): nothing half-read is left on it."""
        deadline = time.monotonic() + self.timeout_s
        try:
            header = self._send(frame(request), deadline)
            control_bytes, data_bytes = parse_header(header, max_data_bytes)
            reply = wire.decode_reply(recv_exactly(self.sock, control_bytes, deadline))
            data = None
            if data_bytes:
                if not isinstance(reply, wire.BlocksHeader):
                    raise wire.WireError(f"a {type(reply).__name__} reply with a data part")
                data = receive_buffer(data_bytes, pinned)
                recv_into(self.sock, memoryview(data.numpy()), deadline)
            return reply, data
        except BaseException as exc:
            self.close()
            if isinstance(exc, wire.WireError):
                raise TransferFailed(f"bad reply from {self.endpoint}: {exc}") from None
            if isinstance(exc, TimeoutError):
                raise self._no_answer("") from None
            if isinstance(exc, OSError):
                raise TransferFailed(f"prefill worker {self.endpoint}: {exc}") from None
            raise

    def _send(self, payload: bytes, deadline: float) -> bytes:
        """Send a request, return its reply's frame header. A reused connection that the
        prefill worker closed while it was idle is opened again, once."""
        for attempt in range(2):
            reused = self.sock is not None
            if not reused:
                self._connect(deadline)
            assert self.sock is not None
            try:
                self.sock.settimeout(max(0.001, deadline - time.monotonic()))
                self.sock.sendall(payload)
                return bytes(recv_exactly(self.sock, HEADER.size, deadline))
            except (ConnectionClosed, ConnectionResetError, BrokenPipeError) as exc:
                self.close()
                nothing_back = not isinstance(exc, ConnectionClosed) or exc.received == 0
                if not (reused and nothing_back and attempt == 0):
                    raise TransferFailed(
                        f"prefill worker {self.endpoint} closed the connection"
                    ) from None
        raise AssertionError("unreachable")

    def _connect(self, deadline: float) -> None:
        """Connect by the deadline; a refused connection is tried again until then (the
        prefill worker may be binding its port)."""
        while True:
            remaining = deadline - time.monotonic()
            try:
                sock = socket.create_connection(self.address, timeout=max(0.001, remaining))
                break
            except ConnectionRefusedError:
                if remaining <= RETRY_SLEEP_S:
                    raise self._no_answer(" (connection refused)") from None
                time.sleep(RETRY_SLEEP_S)
            except TimeoutError:
                raise self._no_answer("") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:  # the handshake, by the same deadline (closes sock if it fails)
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                self.sock = SealedStream(sock, self.tls, server_hostname=self.address[0])
            except KeyShareRefused as exc:
                hint = _NOT_SEALING if exc.reply.code == wire.BAD_REQUEST else ""
                raise TransferFailed(
                    f"prefill worker {self.endpoint} refused the connection {exc}{hint}"
                ) from None
            return
        self.sock = sock

    def _no_answer(self, why: str) -> TransferFailed:
        milliseconds = int(self.timeout_s * 1000)
        return TransferFailed(
            f"prefill worker {self.endpoint} did not answer within {milliseconds} ms{why}"
        )

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def address_of(endpoint: str) -> tuple[str, int]:
    """("host", port) of "tcp://host:port" ("[v6]" hosts too)."""
    host, sep, port = endpoint.removeprefix("tcp://").rpartition(":")
    if not sep or not port.isdigit():
        raise TransferFailed(f"not a side-channel endpoint: {endpoint!r}")
    return host.strip("[]"), int(port)


# Channels are reused per pulling thread and prefill endpoint: no connection set-up per
# request. A channel that saw any failure is discarded (a late reply could still arrive on it).
_local = threading.local()


def channel_for(endpoint: str, timeout_s: float, tls: ssl.SSLContext | None) -> Channel:
    """This thread's channel to endpoint with these settings (made on first use; the oldest
    goes past _MAX_CHANNELS_PER_THREAD)."""
    cache: dict[tuple, Channel] = _local.__dict__.setdefault("by_key", {})
    key = (endpoint, timeout_s, tls)
    channel = cache.get(key)
    if channel is None:
        if len(cache) >= _MAX_CHANNELS_PER_THREAD:  # endpoints come and go: drop the oldest
            cache.pop(next(iter(cache))).close()
        channel = cache[key] = Channel(endpoint, timeout_s, tls)
    return channel


def discard(channel: Channel) -> None:
    """Close channel and forget it: this thread's next ask to its endpoint connects anew."""
    cache: dict[tuple, Channel] = _local.__dict__.get("by_key", {})
    for key, cached in list(cache.items()):
        if cached is channel:
            del cache[key]
    channel.close()


def receive_buffer(nbytes: int, pinned: bool) -> torch.Tensor:
    """This thread's buffer for a reply's data part, grown as needed and reused by its next
    read: a new one per read paid a page fault per 4 KiB written (measured: a 32 MiB socket
    pull here took 42-46 ms with one, 32-33 ms reusing it). At most one read's worth
    (max_chunk_bytes) per pull thread stays allocated."""
    local = _local.__dict__
    key = "receive_pinned" if pinned else "receive"
    buffer: torch.Tensor | None = local.get(key)
    if buffer is None or buffer.numel() < nbytes:
        buffer = local[key] = None  # the old one goes before the new one is made
        buffer = local[key] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    return buffer[:nbytes]
