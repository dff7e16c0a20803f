"""Prefill side of the side channel: serves reads of held KV blocks to decode workers.

`listener.py` runs the connections (TCP, bounded frames, one thread); this module answers each
request. A read is checked before a byte is copied: protocol version, its size (block ids
unique, at most `max_chunk_bytes` of them unless written in place), transfer id and the blocks
that transfer holds, then the fingerprint (a peer is told which fields differ, never our
values). The blocks are gathered once into a staging buffer that goes out as the reply's data
part without a copy, or, for a decode worker on the same host, into a shared-memory segment
whose name goes out instead (`shm.py`), or, when that worker sent CUDA IPC handles of its
cache, straight into its blocks, device to device (`cuda_ipc.py`). The transfer stays pinned in
the registry (READING) only while the gather (or the device copy) runs; the send itself reads
the staging buffer, not the KV cache. A ReadHeads (a decode worker of another TP size) gathers
only its head range of each block (`head_slices.py`), checked against this worker's heads after
the transfer id and the fingerprint; a server without a `HeadSlicer` refuses it.

With a TLS context (`tls.py`) every connection starts with a mutual TLS handshake and the
requests, the replies and the socket's data parts travel sealed (`sealing.py`); a peer without
a certificate of the CA is refused before its first request. The same-host paths stay: shared
memory and CUDA IPC move the bytes inside this host (its boot and IPC namespace:
`shm.host_id`), where the host is the trust boundary; only their control messages cross the
(sealed) socket.
"""

from __future__ import annotations

import ssl
from collections import OrderedDict
from collections.abc import Callable

import torch

from vllm_llmd.kv_layout import KVLayoutFingerprint
from vllm_llmd.log import get_logger
from vllm_llmd.transfer import messages as wire
from vllm_llmd.transfer.framing import frame
from vllm_llmd.transfer.head_slices import HeadSlicer
from vllm_llmd.transfer.listener import FrameServer
from vllm_llmd.transfer.registry import SendRegistry
from vllm_llmd.transfer.shm import ShmStaging, host_id

logger = get_logger(__name__)

# gather(block_ids, out) -> contiguous uint8 tensor, block-major, every layer's page per block:
# `out` when given (filled), else a new one
GatherFn = Callable[[list[int], torch.Tensor | None], torch.Tensor]
# ipc_write(block_ids, peer cache, peer block ids): a device-to-device copy, done on return
# (CudaIpcWriter.write); raises IpcUnavailable, or ValueError for a bad description
IpcWriteFn = Callable[[list[int], wire.CudaIpcCache, list[int]], None]
# the decode side's default bound on one read's bytes (LLMDConnectorConfig.max_chunk_bytes)
DEFAULT_MAX_CHUNK_BYTES = 64 << 20


class TransferServer:
    """Serves `ReadBlocks` and `ReleaseTransfer` for one worker, on its own thread."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: SendRegistry,
        gather: GatherFn,
        fingerprint: KVLayoutFingerprint,
        block_bytes: int,
        *,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        same_host_shm: bool = True,
        ipc_write: IpcWriteFn | None = None,
        tls: ssl.SSLContext | None = None,
        head_slicer: HeadSlicer | None = None,
    ) -> None:
        self.registry = registry
        self._head_slicer = head_slicer
        self.host_id = host_id() if same_host_shm else ""
        self._ipc_write = ipc_write
        self._shm = ShmStaging()
        # socket replies: a staging buffer per peer, reused by its next read
        self._buffers = PeerBuffers(max_bytes=4 * max_chunk_bytes)
        self._gather = gather
        self._fingerprint = fingerprint
        self._block_bytes = block_bytes
        # one read moves at most this many blocks (at least one, as the decode side reads)
        self.max_read_blocks = max(1, max_chunk_bytes // block_bytes)
        self.max_chunk_bytes = max_chunk_bytes
        self.bytes_sent = 0
        self.bytes_shared = 0  # sent through shared memory
        self.bytes_ipc = 0  # written into same-host peers' GPU caches
        self.host = host
        self.tls = tls is not None
        self.connections = FrameServer(host, port, self._answer, self._forget, tls=tls)
        self.port = self.connections.port

    @property
    def failure(self) -> str | None:
        """Why the side channel stopped serving (it then refuses every peer), else None."""
        return self.connections.failure

    def close(self) -> None:
        self.connections.close()
        self._shm.close()
        self._buffers.clear()

    def _forget(self, peer: bytes) -> None:
        """A peer disconnected: its staging goes."""
        self._shm.forget(peer)
        self._buffers.forget(peer)

    def _answer(self, peer: bytes, control: bytes) -> list:
        """The reply frame's parts to one request frame (listener.Handler)."""
        try:
            request = wire.decode_request(control)
        except wire.WireError as exc:
            logger.warning("LLMD side channel: refused a malformed request: %s", exc)
            return [frame(wire.error("", wire.BAD_REQUEST, str(exc)))]
        if isinstance(request, wire.ReleaseTransfer):
            self.registry.release(
                request.transfer_id, request.success, request.reason, request.num_consumers
            )
            return [frame(wire.Ack(version=wire.PROTOCOL_VERSION, transfer_id=request.transfer_id))]
        reply, *data = self._read(peer, request)
        return [frame(reply, sum(part.nbytes for part in data)), *data]

    def _read(self, peer: bytes, request: wire.ReadBlocks) -> list:
        def error(code: str, message: str) -> list:
            return [wire.error(request.transfer_id, code, message)]

        heads = None
        block_bytes = self._block_bytes
        if isinstance(request, wire.ReadHeads):
            if self._head_slicer is None:
                return error(wire.BAD_REQUEST, "this prefill worker serves whole blocks only")
            if request.ipc_cache is not None:
                return error(wire.BAD_REQUEST, "CUDA IPC writes whole blocks, not head slices")
            heads = (request.head_start, request.head_end)
            block_bytes = self._head_slicer.block_bytes(max(1, heads[1] - heads[0]))
        block_ids = request.block_ids
        if not block_ids:
            return error(wire.BAD_REQUEST, "a read of no blocks")
        same_host = bool(self.host_id) and request.host_id == self.host_id
        in_place = same_host and request.ipc_cache is not None and self._ipc_write is not None
        # a read written in place (CUDA IPC, page to page) allocates nothing here: unbounded
        if not in_place and len(block_ids) > max(1, self.max_chunk_bytes // block_bytes):
            return error(
                wire.TOO_LARGE,
                f"a read of {len(block_ids)} blocks ({len(block_ids) * block_bytes} bytes) "
                f"exceeds this prefill worker's max_chunk_bytes ({self.max_chunk_bytes}): "
                "set the decode side's max_chunk_bytes no larger",
            )
        problem = self.registry.begin_read(request.transfer_id, block_ids)
        if problem is not None:
            return error(wire.UNKNOWN_TRANSFER, problem)
        # Only a peer holding the transfer id gets this far; it is told field names, no values.
        differing = self._fingerprint.differing_fields(request.fingerprint)
        if differing:
            self.registry.end_read(request.transfer_id)
            return error(
                wire.INCOMPATIBLE,
                "KV layouts differ (prefill vs decode) in: " + ", ".join(differing),
            )
        if heads is not None and self._head_slicer is not None:
            bad_heads = self._head_slicer.check_heads(heads)
            if bad_heads:
                self.registry.end_read(request.transfer_id)
                return error(wire.BAD_REQUEST, bad_heads)
        if in_place:
            return self._write_ipc(request, error)
        nbytes = len(block_ids) * block_bytes
        try:
            if same_host:
                shm_name, out = self._shm.buffer_for(peer, nbytes)
                self._gather_into(block_ids, heads, out)
                del out  # the segment may be resized or unlinked later: no view outlives this
            else:
                kept = self._buffers.take(peer, nbytes)
                staging = self._gather_into(block_ids, heads, kept)
                self._buffers.keep(peer, staging)
        finally:
            self.registry.end_read(request.transfer_id)
        if same_host:
            self.bytes_shared += nbytes
            shm_header = wire.ShmBlocksHeader(
                version=wire.PROTOCOL_VERSION,
                transfer_id=request.transfer_id,
                num_blocks=len(block_ids),
                block_bytes=block_bytes,
                shm_name=shm_name,
            )
            return [shm_header]
        if staging.numel() != nbytes:
            raise RuntimeError(f"gather returned {staging.numel()} bytes, expected {nbytes}")
        self.bytes_sent += staging.numel()
        header = wire.BlocksHeader(
            version=wire.PROTOCOL_VERSION,
            transfer_id=request.transfer_id,
            num_blocks=len(block_ids),
            block_bytes=block_bytes,
        )
        # the view keeps the staging buffer alive until the loop has sent it
        return [header, memoryview(staging.numpy()).cast("B")]

    def _gather_into(
        self, block_ids: list[int], heads: tuple[int, int] | None, out: torch.Tensor | None
    ) -> torch.Tensor:
        if heads is None:
            return self._gather(block_ids, out)
        assert self._head_slicer is not None
        return self._head_slicer.gather(block_ids, heads, out)

    def _write_ipc(self, request: wire.ReadBlocks, error: Callable[[str, str], list]) -> list:
        """The blocks straight into the peer's cache (the read is already begun)."""
        assert self._ipc_write is not None and request.ipc_cache is not None
        try:
            self._ipc_write(request.block_ids, request.ipc_cache, request.ipc_block_ids)
        except ValueError as exc:
            return error(wire.BAD_REQUEST, f"CUDA IPC write refused: {exc}")
        except Exception as exc:  # IpcUnavailable, or a CUDA error of the copy: not fatal
            logger.warning("LLMD side channel: %s; that peer reads without CUDA IPC", exc)
            return error(wire.IPC_UNAVAILABLE, str(exc))
        finally:
            self.registry.end_read(request.transfer_id)
        self.bytes_ipc += len(request.block_ids) * self._block_bytes
        return [
            wire.IpcBlocksWritten(
                version=wire.PROTOCOL_VERSION,
                transfer_id=request.transfer_id,
                num_blocks=len(request.block_ids),
            )
        ]


class PeerBuffers:
    """The socket path's staging buffers, one per peer: the listener reads a peer's next
    request only once its last reply went out, so that read may gather into the same buffer.
    A new buffer per read paid a page fault per 4 KiB gathered (a CPU cache; on CUDA the
    buffers are pinned, which torch caches anyway). At most max_bytes are kept in all, the
    least recently used peer's buffer going first."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._buffers: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    def take(self, peer: bytes, nbytes: int) -> torch.Tensor | None:
        """nbytes of the peer's buffer, or None if it has none that large."""
        buffer = self._buffers.get(peer)
        if buffer is None or buffer.numel() < nbytes:
            return None
        return buffer[:nbytes]

    def keep(self, peer: bytes, staging: torch.Tensor) -> None:
        """Keep the buffer behind `staging` (a buffer from `take`, or a new one) for the
        peer's next read."""
        kept = self._buffers.pop(peer, None)
        if kept is None or staging.untyped_storage().data_ptr() != kept.data_ptr():
            kept = staging
        self._buffers[peer] = kept
        total = sum(buffer.numel() for buffer in self._buffers.values())
        while total > self.max_bytes and len(self._buffers) > 1:
            _, oldest = self._buffers.popitem(last=False)
            total -= oldest.numel()

    def forget(self, peer: bytes) -> None:
        self._buffers.pop(peer, None)

    def clear(self) -> None:
        self._buffers.clear()
