"""Decode side of the side channel: pull a prefill's blocks, then release them.

`pull_blocks` reads in chunks of at most `max_chunk_bytes`, hands each chunk to a `scatter`
callback that writes it into the local KV cache, and always ends with a release telling the
prefill worker the outcome, so its blocks are freed at once instead of at lease expiry. Every
wait is bounded by `timeout_s`; any failure raises TransferFailed with a reason for the logs.

On the same host (`shm.host_id()` equal on both sides) the prefill worker may answer through
shared memory: the chunk is scattered straight from its segment. An endpoint whose segment
cannot be opened is read through the socket from then on. With a CUDA cache (`PullSpec.ipc`)
the prefill worker may instead write the chunk into our blocks itself, device to device
(`cuda_ipc.py`): nothing is left to scatter. An endpoint that cannot is read as above from then
on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import zmq

from vllm_llmd.transfer import messages as wire
from vllm_llmd.transfer.shm import ShmReader, host_id

# scatter(first_index, data): data holds blocks first_index.. of the pull, block-major
ScatterFn = Callable[[int, torch.Tensor], None]


class TransferFailed(RuntimeError):
    """A pull that did not complete; the message says why."""


@dataclass(frozen=True)
class PullSpec:
    """One decode worker's pull of one request's blocks from one prefill worker."""

    endpoint: str  # tcp://host:port of the prefill worker
    transfer_id: str
    fingerprint: wire.KVLayoutFingerprint
    # prefill-side block ids to read, in the order the scatter callback expects them
    remote_block_ids: tuple[int, ...]
    # bytes of one block id in a data frame (every layer's page of it)
    block_bytes: int
    # same-host CUDA path: our cache's IPC description, and where each remote block goes
    ipc: wire.CudaIpcCache | None = None
    local_block_ids: tuple[int, ...] = ()


class _Channel:
    """A DEALER socket to one prefill worker with bounded request/reply."""

    def __init__(self, endpoint: str, timeout_s: float, max_reply_bytes: int) -> None:
        self.endpoint = endpoint
        self.timeout_ms = int(timeout_s * 1000)
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
        self.socket.setsockopt(zmq.RCVTIMEO, self.timeout_ms)
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_reply_bytes)
        self.socket.connect(endpoint)

    def ask(self, request: wire.Request) -> tuple[wire.Reply, list[zmq.Frame]]:
        try:
            self.socket.send(wire.encode(request))
            frames = self.socket.recv_multipart(copy=False)
        except zmq.Again:
            raise TransferFailed(
                f"prefill worker {self.endpoint} did not answer within {self.timeout_ms} ms"
            ) from None
        try:
            return wire.decode_reply(frames[0].buffer), frames[1:]
        except wire.WireError as exc:
            raise TransferFailed(f"bad reply from {self.endpoint}: {exc}") from None

    def close(self) -> None:
        self.socket.close(linger=0)


# Channels are reused per pulling thread and prefill endpoint: no connection set-up per
# request. A channel that saw any failure is discarded (a late reply could still arrive on it).
_channels = threading.local()
_MAX_CHANNELS_PER_THREAD = 64
_HOST_ID = host_id()


def _shm_state() -> tuple[ShmReader, set[str], set[str]]:
    """This thread's segment mappings, the endpoints whose segments it could not open, and
    those that cannot write into our cache through CUDA IPC."""
    local = _channels.__dict__
    if "shm_reader" not in local:
        local["shm_reader"], local["no_shm"], local["no_ipc"] = ShmReader(), set(), set()
    return local["shm_reader"], local["no_shm"], local["no_ipc"]


def _channel_for(endpoint: str, timeout_s: float, max_reply_bytes: int) -> _Channel:
    cache: dict[tuple, _Channel] = _channels.__dict__.setdefault("by_key", {})
    key = (endpoint, timeout_s, max_reply_bytes)
    channel = cache.get(key)
    if channel is None:
        if len(cache) >= _MAX_CHANNELS_PER_THREAD:  # endpoints come and go: drop the oldest
            cache.pop(next(iter(cache))).close()
        channel = cache[key] = _Channel(endpoint, timeout_s, max_reply_bytes)
    return channel


def _discard(channel: _Channel) -> None:
    cache: dict[tuple, _Channel] = _channels.__dict__.get("by_key", {})
    for key, cached in list(cache.items()):
        if cached is channel:
            del cache[key]
    channel.close()


def _chunks(count: int, per_chunk: int) -> list[tuple[int, int]]:
    return [(start, min(start + per_chunk, count)) for start in range(0, count, per_chunk)]


def pull_blocks(
    spec: PullSpec,
    scatter: ScatterFn,
    *,
    timeout_s: float,
    unknown_transfer_grace_s: float,
    max_chunk_bytes: int,
    same_host_shm: bool = True,
) -> int:
    """Read every block of spec into the local cache via scatter; returns bytes received."""
    bytes_per_block = spec.block_bytes
    per_chunk = max(1, max_chunk_bytes // bytes_per_block)
    channel = _channel_for(
        spec.endpoint, timeout_s, per_chunk * bytes_per_block + wire.MAX_CONTROL_BYTES
    )
    received, reason = 0, ""
    try:
        for start, end in _chunks(len(spec.remote_block_ids), per_chunk):
            data = _read_chunk(
                channel,
                spec,
                (start, end),
                unknown_transfer_grace_s,
                same_host_shm,
            )
            if data is None:  # written into our blocks by the prefill worker (CUDA IPC)
                received += (end - start) * bytes_per_block
                continue
            if data.numel() != (end - start) * bytes_per_block:
                raise TransferFailed(
                    f"short read: {data.numel()} bytes for {end - start} blocks of "
                    f"{bytes_per_block} bytes"
                )
            scatter(start, data)
            received += data.numel()
        return received
    except TransferFailed as exc:
        reason = str(exc)
        raise
    finally:
        released = _release(channel, spec.transfer_id, success=not reason, reason=reason)
        if reason or not released:
            _discard(channel)


def _read_chunk(
    channel: _Channel, spec: PullSpec, chunk: tuple[int, int], grace_s: float, shm: bool
) -> torch.Tensor | None:
    """Blocks chunk[0]..chunk[1] of the pull as bytes, or None if they were written in place."""
    reader, no_shm, no_ipc = _shm_state()
    same_host = shm and bool(_HOST_ID)
    use_shm = same_host and spec.endpoint not in no_shm
    use_ipc = same_host and spec.ipc is not None and spec.endpoint not in no_ipc
    start, end = chunk
    request = wire.ReadBlocks(
        version=wire.PROTOCOL_VERSION,
        transfer_id=spec.transfer_id,
        fingerprint=spec.fingerprint,
        block_ids=list(spec.remote_block_ids[start:end]),
        host_id=_HOST_ID if use_shm or use_ipc else "",
        ipc_cache=spec.ipc if use_ipc else None,
        ipc_block_ids=list(spec.local_block_ids[start:end]) if use_ipc else [],
    )
    deadline = time.monotonic() + grace_s
    while True:
        reply, frames = channel.ask(request)
        if isinstance(reply, wire.IpcBlocksWritten) and use_ipc:
            if reply.num_blocks != end - start:
                raise TransferFailed(f"short write: {reply.num_blocks} of {end - start} blocks")
            return None
        if use_ipc and not isinstance(reply, wire.TransferError):
            no_ipc.add(spec.endpoint)  # a prefill without the path answered with bytes
        if isinstance(reply, wire.BlocksHeader) and len(frames) == 1:
            return torch.frombuffer(frames[0].buffer, dtype=torch.uint8)
        if isinstance(reply, wire.ShmBlocksHeader):
            try:
                if use_shm:
                    return reader.view(reply.shm_name, reply.num_blocks * reply.block_bytes)
            except OSError:  # same boot and IPC namespace, yet not openable: use the socket
                no_shm.add(spec.endpoint)
            return _read_chunk(channel, spec, chunk, grace_s, shm=False)
        if isinstance(reply, wire.TransferError) and reply.code == wire.IPC_UNAVAILABLE:
            no_ipc.add(spec.endpoint)
            return _read_chunk(channel, spec, chunk, grace_s, shm)
        if isinstance(reply, wire.TransferError):
            # The prefill engine registers a transfer one step after it answered: retry briefly.
            if reply.code == wire.UNKNOWN_TRANSFER and time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            raise TransferFailed(f"prefill worker refused the read ({reply.code}): {reply.message}")
        raise TransferFailed(f"unexpected reply {type(reply).__name__} to a read")


def _release(channel: _Channel, transfer_id: str, success: bool, reason: str) -> bool:
    """Best effort: if it is lost, the prefill side frees the blocks at lease expiry.
    Returns whether the prefill worker acknowledged it."""
    try:
        reply, _ = channel.ask(
            wire.ReleaseTransfer(
                version=wire.PROTOCOL_VERSION,
                transfer_id=transfer_id,
                success=success,
                reason=reason[:500],
            )
        )
    except TransferFailed:
        return False
    return isinstance(reply, wire.Ack) and reply.transfer_id == transfer_id


def release_transfer(endpoint: str, transfer_id: str, reason: str, timeout_s: float) -> None:
    """Free a prefill's blocks without reading them (the decode side will not load them)."""
    channel = _channel_for(endpoint, timeout_s, wire.MAX_CONTROL_BYTES)
    if not _release(channel, transfer_id, success=False, reason=reason):
        _discard(channel)
