"""Decode side of the side channel: pull a prefill's blocks, then release them.

`pull_blocks` asks in reads (one `ReadBlocks` and its reply) of at most `max_chunk_bytes` (the
config key's name), hands each read's blocks to a `scatter` callback that writes them into the
local KV cache, and always ends with a release telling the prefill worker the outcome, so its
blocks are freed at once instead of at lease expiry. Every wait is bounded by `timeout_s`,
every retry by a count; any failure raises TransferFailed with a reason for the logs (and
releases the transfer as failed). The connections, their reuse and the receive buffer are
`channel.py`'s.

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

With a TLS context (`tls.py`, `tls=`) every connection starts with a mutual TLS handshake, the
prefill worker's certificate verified against the CA before a request is sent; then requests,
replies and the socket's data parts travel sealed (AES-256-GCM under keys agreed inside TLS:
`sealing.py`). Shared memory and CUDA IPC are still used on the same host: their bytes never
leave it (the host is the trust boundary there).
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vllm_llmd.kv_layout import KVLayoutFingerprint
from vllm_llmd.transfer import messages as wire
from vllm_llmd.transfer.channel import (
    RETRY_SLEEP_S,
    Channel,
    TransferFailed,
    channel_for,
    discard,
)
from vllm_llmd.transfer.shm import ShmReader, host_id

__all__ = ["PullSpec", "ScatterFn", "TransferFailed", "pull_blocks", "release_transfer"]

# scatter(first_index, data): data holds blocks first_index.. of the pull, block-major. It is
# valid during the call only: the next read of this thread reuses its buffer (copy it out).
ScatterFn = Callable[[int, torch.Tensor], None]
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


@dataclass
class _PathState:
    """What this thread learned of each endpoint's same-host paths."""

    reader: ShmReader = field(default_factory=ShmReader)
    no_shm: set[str] = field(default_factory=set)  # its segments could not be opened here
    no_ipc: set[str] = field(default_factory=set)  # it cannot write into our cache (CUDA IPC)
    # it bounds in-place reads by its max_chunk_bytes as it bounds byte reads (older versions)
    chunked_ipc: set[str] = field(default_factory=set)


# what each pulling thread learned of its endpoints' paths (its channels: channel.py)
_paths = threading.local()
_HOST_ID = host_id()


def _path_state() -> _PathState:
    local = _paths.__dict__
    if "paths" not in local:
        local["paths"] = _PathState()
    state: _PathState = local["paths"]
    return state


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
    channel = channel_for(spec.endpoint, timeout_s, tls)
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
            discard(channel)


def _read(
    channel: Channel, spec: PullSpec, start: int, per_read: int, grace_s: float, shm: bool
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
    max_asks = 1 + _MAX_SWITCHES + int(grace_s / RETRY_SLEEP_S) + 2
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
                time.sleep(RETRY_SLEEP_S)
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
    channel: Channel, transfer_id: str, success: bool, reason: str, num_consumers: int = 1
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
    channel = channel_for(endpoint, timeout_s, tls)
    if not _release(channel, transfer_id, success, reason, num_consumers):
        discard(channel)
