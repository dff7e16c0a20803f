"""Same-host GPU→GPU path of the side channel: CUDA IPC, no host staging.

When a decode worker's KV cache is on CUDA and the prefill worker it pulls from is on the same
host (`shm.host_id` equal), the decode worker sends, with each ReadBlocks, a `CudaIpcCache`:
CUDA IPC handles of its cache's storages (exported once, `export_cache`) and where each segment
sits in them, plus the block ids to fill. The prefill worker opens the handles (once per peer,
`CudaIpcWriter`), and copies the blocks device to device with the copy kernels of
`vllm_llmd.ops`: page to page from its own cache into the peer's (`copy_blocks`: one pass,
no staging buffer; over NVLink or PCIe peer access), on a side stream that it synchronises
before answering `IpcBlocksWritten`.

Why the prefill side writes, rather than the decode side reading: the blocks are pinned in the
prefill's registry (READING) exactly while the copy runs, as on the other paths. A reader
holding handles to the prefill's cache could outlive its lease; a writer never does.

What is checked (`ipc_checks.py`), since the kernels write to raw addresses: every field of
the description, before anything is opened (layout equal to ours, which the fingerprint already
fixed; bounds, signs, alignment, handle lengths, segments inside the storages claimed, target
ids); then, once a handle is open, each storage's claimed range against the real size of the
allocation the driver mapped (`cuda_driver.py`). Only the handle itself reaches CUDA: no size,
offset or ref-counter file of the peer's (torch's `_new_shared_cuda`, which takes those on
trust, is not used). The mapping is wrapped as a storage that does not own it; the writer
closes it when the last peer using it is dropped.

Failure: a cache that cannot be exported (not CUDA; memory from vLLM's sleep-mode allocator,
which cudaIpcGetMemHandle refuses) sends no handles. A handle that cannot be opened (the peer's
GPU is not visible here, no peer access) raises `IpcUnavailable`: the server answers
`ipc_unavailable` and the decode worker reads that endpoint through shared memory or the socket
from then on.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from vllm_llmd.log import get_logger
from vllm_llmd.ops import PagedKVCache, copy_blocks
from vllm_llmd.transfer import messages as wire
from vllm_llmd.transfer.cuda_driver import CudaDriver, IpcDriver
from vllm_llmd.transfer.ipc_checks import check_description, check_mapped

logger = get_logger(__name__)


class IpcUnavailable(RuntimeError):
    """CUDA IPC cannot be used between these two workers (the message says why)."""


_driver: CudaDriver | None = None
_driver_lock = threading.Lock()


def cuda_driver() -> CudaDriver:
    """The process's CudaDriver, loaded at first use; IpcUnavailable if it cannot be."""
    global _driver
    with _driver_lock:
        if _driver is None:
            try:
                _driver = CudaDriver()
            except Exception as exc:  # no libcuda.so.1, or no device
                raise IpcUnavailable(f"the CUDA driver cannot be used: {exc}") from exc
        return _driver


def export_cache(cache: PagedKVCache, driver: IpcDriver | None = None) -> wire.CudaIpcCache:
    """The decode side's description of its cache for same-host writers: per storage, the
    IPC handle of the allocation holding it and where in that allocation it lies.

    Raises IpcUnavailable when the cache cannot be shared (not on CUDA, or its memory refuses
    IPC export).
    """
    if driver is None:
        if cache.device.type != "cuda":
            raise IpcUnavailable(f"the KV cache is on {cache.device}, not CUDA")
        driver = cuda_driver()
    handles: dict[int, bytes] = {}  # allocation base -> its handle
    indices: dict[int, int] = {}  # storage address -> index in storages
    storages: list[wire.CudaIpcStorage] = []
    for storage in cache.storages:
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if ptr in indices:
            continue
        try:
            base, size = driver.allocation_range(ptr, cache.device)
            if base not in handles:
                handles[base] = driver.export_handle(base, cache.device)
        except Exception as exc:  # e.g. VMM memory (sleep mode): cuIpcGetMemHandle fails
            raise IpcUnavailable(f"its memory cannot be exported for CUDA IPC: {exc}") from exc
        if not base <= ptr <= ptr + nbytes <= base + size:
            raise IpcUnavailable(
                f"a storage at {ptr:#x} (+{nbytes}) is not inside its allocation "
                f"at {base:#x} (+{size})"
            )
        indices[ptr] = len(storages)
        storages.append(
            wire.CudaIpcStorage(handle=handles[base], offset_bytes=ptr - base, size_bytes=nbytes)
        )
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


@dataclass
class _Mapping:
    """A peer's allocation opened here."""

    ptr: int  # its base, as mapped in our context
    nbytes: int  # from ptr to the allocation's end, as the driver reports it
    users: int = 0  # opened peers that write into it


@dataclass(frozen=True)
class _Peer:
    cache: PagedKVCache
    handles: tuple[bytes, ...]  # distinct; each holds one use of its mapping


class CudaIpcWriter:
    """Prefill side: writes blocks of its cache into same-host peers' caches.

    Opened peers are kept (at most `max_peers`, least recently used dropped); each peer
    allocation is opened once, and closed when no kept peer uses it. Blocks go page to page
    (`ops.copy_blocks`: one pass over the bytes, no staging buffer), on a stream of its own.
    Thread-safe.
    """

    def __init__(
        self,
        cache: PagedKVCache,
        *,
        driver: IpcDriver | None = None,
        max_peers: int = 8,
    ) -> None:
        self.cache = cache
        self.max_peers = max_peers
        self._driver = driver
        self._mappings: dict[bytes, _Mapping] = {}
        self._peers: OrderedDict[tuple, _Peer] = OrderedDict()
        self._stream = torch.cuda.Stream(cache.device) if cache.device.type == "cuda" else None
        self._lock = threading.Lock()
        self.bytes_written = 0

    def write(self, block_ids: list[int], target: wire.CudaIpcCache, target_ids: list[int]) -> None:
        """Copy our block_ids[i] into the peer's target_ids[i], finished when this returns.

        Raises:
            ValueError: the target does not describe a cache like ours that fits in the memory
                its handles open, or bad ids.
            IpcUnavailable: its handles cannot be opened here.
        """
        check_description(target, self.cache, target_ids, len(block_ids))
        with self._lock:
            peer = self._peer(target)
            if self._stream is None:
                copy_blocks(self.cache, block_ids, peer, target_ids)
            else:
                with torch.cuda.stream(self._stream):
                    copy_blocks(self.cache, block_ids, peer, target_ids)
                self._stream.synchronize()
            self.bytes_written += self.cache.buffer_bytes(len(block_ids))

    def close(self) -> None:
        with self._lock:
            while self._peers:
                self._drop(self._peers.popitem(last=False)[1].handles)

    def _peer(self, target: wire.CudaIpcCache) -> PagedKVCache:
        """The peer's cache as mapped here (target already checked)."""
        key = (
            tuple((s.handle, s.offset_bytes, s.size_bytes) for s in target.storages),
            tuple(target.segment_storages),
            tuple(target.segment_offsets),
            target.num_blocks,
        )
        peer = self._peers.get(key)
        if peer is not None:
            self._peers.move_to_end(key)
            return peer.cache
        ours = self.cache
        handles = tuple(dict.fromkeys(storage.handle for storage in target.storages))
        opened: list[bytes] = []
        try:
            for handle in handles:
                self._open(handle, target.device_uuid)
                opened.append(handle)
            storages = []
            for index, described in enumerate(target.storages):
                mapping = self._mappings[described.handle]
                check_mapped(f"storages[{index}]", described, mapping.nbytes)
                storages.append(
                    _unowned_storage(
                        mapping.ptr + described.offset_bytes, described.size_bytes, ours.device
                    )
                )
            cache = PagedKVCache.from_segments(
                ours,
                target.num_blocks,
                [storages[index] for index in target.segment_storages],
                target.segment_offsets,
            )
        except BaseException:
            self._drop(tuple(opened))
            raise
        self._peers[key] = _Peer(cache, handles)
        while len(self._peers) > self.max_peers:
            self._drop(self._peers.popitem(last=False)[1].handles)
        logger.info(
            "LLMD side channel: writing to a same-host peer's KV cache (GPU %s) through CUDA IPC",
            target.device_uuid or "?",
        )
        return cache

    def _open(self, handle: bytes, device_uuid: str) -> None:
        """One more use of the allocation behind handle, opened if it is not yet."""
        mapping = self._mappings.get(handle)
        if mapping is None:
            device = self.cache.device
            try:
                driver = self._driver or cuda_driver()
                ptr = driver.open_handle(handle, device)
            except Exception as exc:
                raise IpcUnavailable(
                    f"cannot open the peer's CUDA IPC handles (GPU {device_uuid or '?'}) "
                    f"on {device}: {exc}"
                ) from exc
            try:
                base, size = driver.allocation_range(ptr, device)
                if not base <= ptr < base + size:
                    raise RuntimeError(f"{ptr:#x} is outside its own range {base:#x} (+{size})")
            except Exception as exc:
                _close_quietly(driver, ptr, device)
                raise IpcUnavailable(f"the peer's allocation's size is unknown: {exc}") from exc
            mapping = _Mapping(ptr=ptr, nbytes=base + size - ptr)
            self._mappings[handle] = mapping
        mapping.users += 1

    def _drop(self, handles: tuple[bytes, ...]) -> None:
        """One use less of each handle's allocation; closed when it has none."""
        for handle in handles:
            mapping = self._mappings[handle]
            mapping.users -= 1
            if mapping.users == 0:
                del self._mappings[handle]
                _close_quietly(self._driver or cuda_driver(), mapping.ptr, self.cache.device)


def _unowned_storage(ptr: int, nbytes: int, device: torch.device) -> torch.UntypedStorage:
    # Does not own (nor free) the memory, and takes ptr's device from us: torch.as_tensor on
    # a __cuda_array_interface__ would label it with the owning GPU's and, for another GPU,
    # copy it. The mapping outlives it: it is closed only once its peers are dropped.
    return torch._C._construct_storage_from_data_pointer(ptr, device, nbytes)


def _close_quietly(driver: IpcDriver, ptr: int, device: torch.device) -> None:
    try:
        driver.close_handle(ptr, device)
    except Exception:  # the mapping is unusable either way; keep serving
        logger.exception("LLMD side channel: closing a peer's CUDA IPC mapping failed")
