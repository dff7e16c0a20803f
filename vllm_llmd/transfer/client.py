"""Decode side of the side channel: pull a prefill's blocks, then release them.

`pull_blocks` asks in reads (one `ReadBlocks` and its reply) of at most `max_chunk_bytes` (the
config key's name), hands each read's blocks to a `scatter` callback that writes them into the
local KV cache, and always ends with a release telling the prefill worker the outcome, so its
blocks are freed at once instead of at lease expiry. Every wait is bounded by `timeout_s`,
every retry by a count; any failure raises TransferFailed with a reason for the logs (and
releases the transfer as failed).

Nothing a prefill worker answers can make this side hold more than it asked for: a reply's
lengths are checked against the read before its bytes are received (`framing.py`), and the
data part goes straight into a buffer of exactly that size.

On the same host (`shm.host_id()` equal on both sides) the prefill worker may answer through
shared memory: the read's blocks are scattered straight from its segment. An endpoint whose segment
cannot be opened is read through the socket from then on. With a CUDA cache (`PullSpec.ipc`)
the prefill worker may instead write the read's blocks into ours itself, device to device
(`cuda_ipc.py`): nothing is left to scatter. An endpoint that cannot is read as above from then
on. Each such switch drops a transport this read offered, so one read is asked at most three
times that way; an answer through a transport the read did not offer fails the pull.

Unequal TP sizes (`tp_mapping.py`): `PullSpec.heads` reads only that range of the prefill
worker's heads (a ReadHeads; `block_bytes` is then the slice's bytes per block and no CUDA IPC
is offered), and the release says how many decode workers read that prefill worker.

With a TLS context (`tls.py`, `tls=`) every connection is mutual TLS and the prefill worker's
certificate is verified against the CA before a request is sent; requests, replies and the
socket's data parts are encrypted. Shared memory and CUDA IPC are still used on the same host:
their bytes never leave it (the host is the trust boundary there).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vllm_llmd.kv_layout import KVLayoutFingerprint
from vllm_llmd.transfer import messages as wire
from vllm_llmd.transfer.framing import (
    HEADER,
    ConnectionClosed,
    frame,
    parse_header,
    recv_exactly,
    recv_into,
)
from vllm_llmd.transfer.shm import ShmReader, host_id
from vllm_llmd.transfer.tls import TlsStream

# scatter(first_index, data): data holds blocks first_index.. of the pull, block-major. It is
# valid during the call only: the next read of this thread reuses its buffer (copy it out).
ScatterFn = Callable[[int, torch.Tensor], None]
# between asks for a transfer the prefill has not registered yet, and between connection tries
_RETRY_SLEEP_S = 0.05
# transport switches (CUDA IPC -> shared memory -> socket) one read may take
_MAX_SWITCHES = 2
# A read written in place (CUDA IPC) moves no bytes over the socket and needs no buffer on
# either side (the prefill copies page to page): it takes every block left, up to this many
# (their ids, twice, must fit one control message).
_MAX_IN_PLACE_BLOCKS = 1 << 14
_NO_HEAD_READS = (
    " (a prefill worker without head-sliced reads: unequal TP sizes need this vllm-llmd "
    "version on the prefill side too)"
)


class TransferFailed(RuntimeError):
    """A pull that did not complete; the message says why."""


@dataclass(frozen=True)
class PullSpec:
    """One decode worker's pull of one request's blocks from one prefill worker."""

    endpoint: str  # tcp://host:port of the prefill worker
    transfer_id: str
    fingerprint: KVLayoutFingerprint
    # prefill-side block ids to read, in the order the scatter callback expects them
    remote_block_ids: tuple[int, ...]
    # bytes of one block id in a data part (every layer's page of it)
    block_bytes: int
    # same-host CUDA path: our cache's IPC description, and where each remote block goes
    ipc: wire.CudaIpcCache | None = None
    local_block_ids: tuple[int, ...] = ()
    # unequal TP sizes: [start, end) of the prefill worker's heads to read (None: whole blocks)
    heads: tuple[int, int] | None = None
    # decode workers that read this prefill worker (each releases it once)
    num_consumers: int = 1
    # receive bytes into pinned host memory (a CUDA cache: the copy to the GPU is a DMA)
    pinned: bool = False


class _Channel:
    """A TCP connection to one prefill worker: one request, one reply, every wait bounded."""

    def __init__(self, endpoint: str, timeout_s: float, tls: ssl.SSLContext | None) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.tls = tls
        self.address = _address(endpoint)
        self.sock: socket.socket | TlsStream | None = None

    def ask(
        self, request: wire.Request, max_data_bytes: int = 0, pinned: bool = False
    ) -> tuple[wire.Reply, torch.Tensor | None]:
        """The reply, and its data part (at most max_data_bytes) if it has one, in this
        thread's receive buffer (`_receive_buffer`: valid until its next ask). Any failure
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
                data = _receive_buffer(data_bytes, pinned)
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
                if remaining <= _RETRY_SLEEP_S:
                    raise self._no_answer(" (connection refused)") from None
                time.sleep(_RETRY_SLEEP_S)
            except TimeoutError:
                raise self._no_answer("") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:  # the handshake, by the same deadline (closes sock if it fails)
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            self.sock = TlsStream(sock, self.tls, server_hostname=self.address[0])
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


def _address(endpoint: str) -> tuple[str, int]:
    """("host", port) of "tcp://host:port" ("[v6]" hosts too)."""
    host, sep, port = endpoint.removeprefix("tcp://").rpartition(":")
    if not sep or not port.isdigit():
        raise TransferFailed(f"not a side-channel endpoint: {endpoint!r}")
    return host.strip("[]"), int(port)


# Channels are reused per pulling thread and prefill endpoint: no connection set-up per
# request. A channel that saw any failure is discarded (a late reply could still arrive on it).
_channels = threading.local()
_MAX_CHANNELS_PER_THREAD = 64
_HOST_ID = host_id()


def _receive_buffer(nbytes: int, pinned: bool) -> torch.Tensor:
    """This thread's buffer for a reply's data part, grown as needed and reused by its next
    read: a new one per read paid a page fault per 4 KiB written (measured: a 32 MiB socket
    pull here took 42-46 ms with one, 32-33 ms reusing it). At most one read's worth
    (max_chunk_bytes) per pull thread stays allocated."""
    local = _channels.__dict__
    key = "receive_pinned" if pinned else "receive"
    buffer: torch.Tensor | None = local.get(key)
    if buffer is None or buffer.numel() < nbytes:
        buffer = local[key] = None  # the old one goes before the new one is made
        buffer = local[key] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    return buffer[:nbytes]


@dataclass
class _PathState:
    """What this thread learned of each endpoint's same-host paths."""

    reader: ShmReader = field(default_factory=ShmReader)
    no_shm: set[str] = field(default_factory=set)  # its segments could not be opened here
    no_ipc: set[str] = field(default_factory=set)  # it cannot write into our cache (CUDA IPC)
    # it bounds in-place reads by its max_chunk_bytes as it bounds byte reads (older versions)
    chunked_ipc: set[str] = field(default_factory=set)


def _path_state() -> _PathState:
    local = _channels.__dict__
    if "paths" not in local:
        local["paths"] = _PathState()
    state: _PathState = local["paths"]
    return state


def _channel_for(endpoint: str, timeout_s: float, tls: ssl.SSLContext | None) -> _Channel:
    cache: dict[tuple, _Channel] = _channels.__dict__.setdefault("by_key", {})
    key = (endpoint, timeout_s, tls)
    channel = cache.get(key)
    if channel is None:
        if len(cache) >= _MAX_CHANNELS_PER_THREAD:  # endpoints come and go: drop the oldest
            cache.pop(next(iter(cache))).close()
        channel = cache[key] = _Channel(endpoint, timeout_s, tls)
    return channel


def _discard(channel: _Channel) -> None:
    cache: dict[tuple, _Channel] = _channels.__dict__.get("by_key", {})
    for key, cached in list(cache.items()):
        if cached is channel:
            del cache[key]
    channel.close()


def pull_blocks(
    spec: PullSpec,
    scatter: ScatterFn,
    *,
    timeout_s: float,
    unknown_transfer_grace_s: float,
    max_chunk_bytes: int,
    same_host_shm: bool = True,
    tls: ssl.SSLContext | None = None,
) -> int:
    """Read every block of spec into the local cache via scatter; returns bytes received.
    tls: the client context of a side channel with TLS (`tls.make_client_context`)."""
    bytes_per_block = spec.block_bytes
    channel = _channel_for(spec.endpoint, timeout_s, tls)
    received, reason = 0, ""
    try:
        if bytes_per_block <= 0 or (spec.heads is not None and spec.heads[0] >= spec.heads[1]):
            raise TransferFailed(f"a pull of {bytes_per_block} bytes per block, heads {spec.heads}")
        per_read = max(1, max_chunk_bytes // bytes_per_block)
        start, count = 0, len(spec.remote_block_ids)
        while start < count:
            data, end = _read(
                channel, spec, start, per_read, unknown_transfer_grace_s, same_host_shm
            )
            if data is None:  # written into our blocks by the prefill worker (CUDA IPC)
                received += (end - start) * bytes_per_block
            else:
                scatter(start, data)
                received += data.numel()
            start = end
        return received
    except Exception as exc:  # a scatter that failed too: the prefill must not hear "done"
        reason = str(exc) or type(exc).__name__
        raise
    finally:
        released = _release(
            channel, spec.transfer_id, not reason, reason, num_consumers=spec.num_consumers
        )
        if reason or not released:
            _discard(channel)


def _read(
    channel: _Channel, spec: PullSpec, start: int, per_read: int, grace_s: float, shm: bool
) -> tuple[torch.Tensor | None, int]:
    """The next blocks of the pull from `start`: (their bytes, or None if they were written in
    place; the index past the last). Bytes come per_read blocks at a time at most; a read
    written in place takes every block left (_MAX_IN_PLACE_BLOCKS at most).

    Bounded: a transport switch must drop a transport this read offered (at most
    _MAX_SWITCHES), and an unknown transfer is asked again only within grace_s."""
    paths = _path_state()
    reader, no_shm, no_ipc = paths.reader, paths.no_shm, paths.no_ipc
    same_host = shm and bool(_HOST_ID)
    count = len(spec.remote_block_ids)
    deadline = time.monotonic() + grace_s
    max_asks = 1 + _MAX_SWITCHES + int(grace_s / _RETRY_SLEEP_S) + 2
    for _ in range(max_asks):
        offered = use_ipc, use_shm = _offered(spec, same_host, no_ipc, no_shm)
        whole = use_ipc and spec.endpoint not in paths.chunked_ipc
        end = min(count, start + (_MAX_IN_PLACE_BLOCKS if whole else per_read))
        expected = (end - start) * spec.block_bytes
        request = wire.read_request(
            spec.transfer_id,
            spec.fingerprint,
            list(spec.remote_block_ids[start:end]),
            host_id=_HOST_ID if use_shm or use_ipc else "",
            heads=spec.heads,
            ipc_cache=spec.ipc if use_ipc else None,
            ipc_block_ids=list(spec.local_block_ids[start:end]) if use_ipc else [],
        )
        reply, data = channel.ask(request, max_data_bytes=expected, pinned=spec.pinned)
        if isinstance(reply, wire.IpcBlocksWritten) and use_ipc:
            if reply.num_blocks != end - start:
                raise TransferFailed(f"short write: {reply.num_blocks} of {end - start} blocks")
            return None, end
        if use_ipc and not isinstance(reply, wire.TransferError):
            no_ipc.add(spec.endpoint)  # a prefill without the path answered otherwise
        if isinstance(reply, wire.BlocksHeader):
            got = 0 if data is None else data.numel()
            if got != expected or reply.num_blocks != end - start:
                raise TransferFailed(
                    f"short read: {got} bytes for {end - start} blocks of {spec.block_bytes} bytes"
                )
            return data, end
        if isinstance(reply, wire.ShmBlocksHeader) and (use_shm or use_ipc):
            if reply.num_blocks * reply.block_bytes != expected:
                raise TransferFailed(
                    f"short read: {reply.num_blocks} blocks of {reply.block_bytes} bytes in "
                    f"shared memory for {end - start} blocks of {spec.block_bytes} bytes"
                )
            try:
                if use_shm:
                    return reader.view(reply.shm_name, expected), end
            except OSError:  # same boot and IPC namespace, yet not openable: use the socket
                pass
            no_shm.add(spec.endpoint)
        elif isinstance(reply, wire.TransferError) and reply.code == wire.IPC_UNAVAILABLE:
            no_ipc.add(spec.endpoint)
        elif (
            isinstance(reply, wire.TransferError)
            and reply.code == wire.TOO_LARGE
            and whole
            and end - start > per_read
        ):
            paths.chunked_ipc.add(spec.endpoint)  # asked again, in reads of per_read blocks
            continue
        elif isinstance(reply, wire.TransferError):
            # The prefill engine registers a transfer one step after it answered: retry briefly.
            if reply.code == wire.UNKNOWN_TRANSFER and time.monotonic() < deadline:
                time.sleep(_RETRY_SLEEP_S)
                continue
            # no transfer id in a bad_request: it could not even decode a ReadHeads
            old = (
                spec.heads is not None and reply.code == wire.BAD_REQUEST and not reply.transfer_id
            )
            hint = _NO_HEAD_READS if old else ""
            raise TransferFailed(
                f"prefill worker refused the read ({reply.code}): {reply.message}{hint}"
            )
        else:
            raise TransferFailed(
                f"unexpected reply {type(reply).__name__} to a read that offered "
                f"{_transports(offered)}"
            )
        # A transport switch must drop one this read offered: a prefill worker answering
        # through one it was not offered would otherwise be asked again without end.
        if _offered(spec, same_host, no_ipc, no_shm) == offered:
            code = f" ({reply.code})" if isinstance(reply, wire.TransferError) else ""
            raise TransferFailed(
                f"prefill worker answered {type(reply).__name__}{code} to a read that offered "
                f"{_transports(offered)}"
            )
    raise TransferFailed(f"no usable answer to a read after {max_asks} asks")


def _offered(
    spec: PullSpec, same_host: bool, no_ipc: set[str], no_shm: set[str]
) -> tuple[bool, bool]:
    """(CUDA IPC, shared memory): the transports a read of spec may offer now."""
    use_ipc = same_host and spec.ipc is not None and spec.endpoint not in no_ipc
    use_ipc = use_ipc and spec.heads is None  # CUDA IPC writes whole blocks
    return use_ipc, same_host and spec.endpoint not in no_shm


def _transports(offered: tuple[bool, bool]) -> str:
    use_ipc, use_shm = offered
    names = ["CUDA IPC"] * use_ipc + ["shared memory"] * use_shm + ["the socket"]
    return ", ".join(names)


def _release(
    channel: _Channel, transfer_id: str, success: bool, reason: str, num_consumers: int = 1
) -> bool:
    """Best effort: if it is lost, the prefill side frees the blocks at lease expiry.
    Returns whether the prefill worker acknowledged it."""
    try:
        reply, _ = channel.ask(
            wire.ReleaseTransfer(
                version=wire.PROTOCOL_VERSION,
                transfer_id=transfer_id,
                success=success,
                reason=reason[:500],
                num_consumers=num_consumers,
            )
        )
    except TransferFailed:
        return False
    return isinstance(reply, wire.Ack) and reply.transfer_id == transfer_id


def release_transfer(
    endpoint: str,
    transfer_id: str,
    reason: str,
    timeout_s: float,
    tls: ssl.SSLContext | None = None,
    *,
    success: bool = False,
    num_consumers: int = 1,
) -> None:
    """Free a prefill's blocks without reading them (the decode side will not load them, or
    read its heads from another prefill worker: success)."""
    channel = _channel_for(endpoint, timeout_s, tls)
    if not _release(channel, transfer_id, success, reason, num_consumers):
        _discard(channel)
