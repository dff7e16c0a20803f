"""Same-host GPU→GPU path of the side channel: CUDA IPC, no host staging.

When a decode worker's KV cache is on CUDA and the prefill worker it pulls from is on the same
host (`shm.host_id` equal), the decode worker sends, with each ReadBlocks, a `CudaIpcCache`:
CUDA IPC handles of its cache's storages (exported once, `export_cache`) and where each segment
sits in them, plus the block ids to fill. The prefill worker opens the handles (once per peer,
`CudaIpcWriter`), and copies the blocks device to device with the copy kernels of
`vllm_llmd.ops`: gather from its own cache into a device staging buffer, scatter from there
into the peer's pages (over NVLink or PCIe peer access), on a side stream that it synchronises
before answering `IpcBlocksWritten`.

Why the prefill side writes, rather than the decode side reading: the blocks are pinned in the
prefill's registry (READING) exactly while the copy runs, as on the other paths. A reader
holding handles to the prefill's cache could outlive its lease; a writer never does.

What is checked first: the peer's description must match this cache's layout (segments, page
bytes, block stride, which the fingerprint already fixed) and every segment must fit in its
storage (`PagedKVCache.from_segments`): the kernels write to raw addresses.

Failure: a cache that cannot be exported (not CUDA; memory from vLLM's sleep-mode allocator,
which cudaIpcGetMemHandle refuses) sends no handles. A handle that cannot be opened (the peer's
GPU is not visible here, no peer access) raises `IpcUnavailable`: the server answers
`ipc_unavailable` and the decode worker reads that endpoint through shared memory or the socket
from then on.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import torch

from vllm_llmd.log import get_logger
from vllm_llmd.ops import PagedKVCache, gather_blocks, scatter_blocks
from vllm_llmd.transfer import messages as wire

logger = get_logger(__name__)

# (storage) -> its IPC description; (description, device) -> the storage opened here
ShareFn = Callable[[torch.UntypedStorage], wire.CudaIpcStorage]
OpenFn = Callable[[wire.CudaIpcStorage, torch.device], torch.UntypedStorage]


class IpcUnavailable(RuntimeError):
    """CUDA IPC cannot be used between these two workers (the message says why)."""


def share_cuda_storage(storage: torch.UntypedStorage) -> wire.CudaIpcStorage:
    """torch's own IPC export of a CUDA allocation (what torch.multiprocessing sends)."""
    (
        _device,
        handle,
        size_bytes,
        offset_bytes,
        ref_counter_handle,
        ref_counter_offset,
        event_handle,
        event_sync_required,
    ) = storage._share_cuda_()
    return wire.CudaIpcStorage(
        handle=bytes(handle),
        size_bytes=int(size_bytes),
        offset_bytes=int(offset_bytes),
        ref_counter_handle=bytes(ref_counter_handle),
        ref_counter_offset=int(ref_counter_offset),
        event_handle=bytes(event_handle or b""),
        event_sync_required=bool(event_sync_required),
    )


def open_cuda_storage(shared: wire.CudaIpcStorage, device: torch.device) -> torch.UntypedStorage:
    """Map a peer's allocation into `device`'s address space (peer access if it is another
    GPU); torch closes the mapping when the storage is freed."""
    torch.cuda._lazy_init()
    return torch.UntypedStorage._new_shared_cuda(
        device.index if device.index is not None else torch.cuda.current_device(),
        shared.handle,
        shared.size_bytes,
        shared.offset_bytes,
        shared.ref_counter_handle,
        shared.ref_counter_offset,
        shared.event_handle or None,
        shared.event_sync_required,
    )


def export_cache(cache: PagedKVCache, share: ShareFn = share_cuda_storage) -> wire.CudaIpcCache:
    """The decode side's description of its cache for same-host writers. Call once: torch
    allocates a reference counter per export.

    Raises IpcUnavailable when the cache cannot be shared (not on CUDA, or its memory refuses
    IPC export).
    """
    if share is share_cuda_storage and cache.device.type != "cuda":
        raise IpcUnavailable(f"the KV cache is on {cache.device}, not CUDA")
    indices: dict[int, int] = {}
    storages: list[wire.CudaIpcStorage] = []
    for storage in cache.storages:
        if storage.data_ptr() not in indices:
            try:
                storages.append(share(storage))
            except Exception as exc:  # e.g. VMM memory (sleep mode): cudaIpcGetMemHandle fails
                raise IpcUnavailable(f"its memory cannot be exported for CUDA IPC: {exc}") from exc
            indices[storage.data_ptr()] = len(indices)
    uuid = ""
    if cache.device.type == "cuda":
        uuid = str(torch.cuda.get_device_properties(cache.device).uuid)
    return wire.CudaIpcCache(
        device_uuid=uuid,
        storages=storages,
        segment_storages=[indices[storage.data_ptr()] for storage in cache.storages],
        segment_offsets=list(cache.offsets),
        num_blocks=cache.num_blocks,
        page_bytes=cache.page_bytes,
        block_stride=cache.block_stride,
    )


class CudaIpcWriter:
    """Prefill side: writes blocks of its cache into same-host peers' caches.

    Opened peers are kept (at most `max_peers`, least recently used dropped, which closes
    their mappings); one device staging buffer is reused and grown as needed. Thread-safe.
    """

    def __init__(
        self,
        cache: PagedKVCache,
        *,
        open_storage: OpenFn = open_cuda_storage,
        max_peers: int = 8,
    ) -> None:
        self.cache = cache
        self.max_peers = max_peers
        self._open_storage = open_storage
        self._peers: OrderedDict[tuple, PagedKVCache] = OrderedDict()
        self._staging = torch.empty(0, dtype=torch.uint8, device=cache.device)
        self._stream = torch.cuda.Stream(cache.device) if cache.device.type == "cuda" else None
        self._lock = threading.Lock()
        self.bytes_written = 0

    def write(self, block_ids: list[int], target: wire.CudaIpcCache, target_ids: list[int]) -> None:
        """Copy our block_ids[i] into the peer's target_ids[i], finished when this returns.

        Raises:
            ValueError: the target does not describe a cache like ours, or bad ids.
            IpcUnavailable: its handles cannot be opened here.
        """
        if len(target_ids) != len(block_ids):
            raise ValueError(f"{len(block_ids)} blocks to write but {len(target_ids)} targets")
        with self._lock:
            peer = self._peer(target)
            nbytes = self.cache.buffer_bytes(len(block_ids))
            if self._staging.numel() < nbytes:
                self._staging = torch.empty(nbytes, dtype=torch.uint8, device=self.cache.device)
            staging = self._staging[:nbytes]
            if self._stream is None:
                gather_blocks(self.cache, block_ids, staging)
                scatter_blocks(peer, target_ids, staging)
            else:
                with torch.cuda.stream(self._stream):
                    gather_blocks(self.cache, block_ids, staging)
                    scatter_blocks(peer, target_ids, staging)
                self._stream.synchronize()
            self.bytes_written += nbytes

    def _peer(self, target: wire.CudaIpcCache) -> PagedKVCache:
        ours = self.cache
        if (target.page_bytes, target.block_stride) != (ours.page_bytes, ours.block_stride):
            raise ValueError(
                f"the peer's pages ({target.page_bytes} bytes every {target.block_stride}) "
                f"differ from ours ({ours.page_bytes} every {ours.block_stride})"
            )
        if len(target.segment_offsets) != len(target.segment_storages) or any(
            not 0 <= index < len(target.storages) for index in target.segment_storages
        ):
            raise ValueError("the peer's segments name storages it did not send")
        key = (
            tuple((s.handle, s.offset_bytes) for s in target.storages),
            tuple(target.segment_storages),
            tuple(target.segment_offsets),
            target.num_blocks,
        )
        peer = self._peers.get(key)
        if peer is not None:
            self._peers.move_to_end(key)
            return peer
        try:
            opened = [self._open_storage(s, ours.device) for s in target.storages]
        except Exception as exc:
            raise IpcUnavailable(
                f"cannot open the peer's CUDA IPC handles (GPU {target.device_uuid or '?'}) "
                f"on {ours.device}: {exc}"
            ) from exc
        peer = PagedKVCache.from_segments(
            ours,
            target.num_blocks,
            [opened[index] for index in target.segment_storages],
            target.segment_offsets,
        )
        self._peers[key] = peer
        while len(self._peers) > self.max_peers:
            self._peers.popitem(last=False)
        logger.info(
            "LLMD side channel: writing to a same-host peer's KV cache (GPU %s) through CUDA IPC",
            target.device_uuid or "?",
        )
        return peer

    def close(self) -> None:
        with self._lock:
            self._peers.clear()
