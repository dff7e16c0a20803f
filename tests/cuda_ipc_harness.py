"""What the CUDA IPC test modules share: a fake of the four CUDA driver calls (no GPU here),
caches, a real prefill side channel, and the decode side's pull.

`FakeDriver` stands in for `cuda_driver.IpcDriver` only (export, open and close a handle, an
allocation's address range), which needs a GPU: its allocations are CPU storages, a handle
names one and opening it gives its address. Everything else is the real code.
"""

from __future__ import annotations

import secrets

import msgspec
import torch
from factories import make_fingerprint, make_paged_cache

from vllm_llmd.kv_layout import KVLayoutFingerprint
from vllm_llmd.ops import PagedKVCache, gather_blocks, scatter_blocks
from vllm_llmd.ops.layouts import KVCacheShape
from vllm_llmd.transfer import messages as wire
from vllm_llmd.transfer.client import PullSpec, pull_blocks
from vllm_llmd.transfer.cuda_driver import IpcDriver
from vllm_llmd.transfer.cuda_ipc import CudaIpcWriter, export_cache
from vllm_llmd.transfer.registry import SendOutcome, SendRegistry
from vllm_llmd.transfer.server import TransferServer

SHAPE = KVCacheShape(num_layers=3, num_blocks=12, num_heads=2, block_size=4, content=8)


class FakeDriver:
    """Stands in for cuMemGetAddressRange / cuIpcGetMemHandle / cuIpcOpenMemHandle /
    cuIpcCloseMemHandle (no GPU here). One process, so a handle opens to the allocation's own
    address; what matters is what it reports: each allocation's real size."""

    def __init__(self) -> None:
        self.allocations: dict[bytes, torch.UntypedStorage] = {}
        self.calls: list[tuple[str, object]] = []  # every argument we were given
        self.mapped: list[int] = []  # open mappings (an address per open)
        self.fail_open = False

    def track(self, cache: PagedKVCache) -> PagedKVCache:
        """Make cache's storages allocations this fake knows (cudaMalloc'd, on a GPU)."""
        for storage in cache.storages:
            if storage not in self.allocations.values():
                self.allocations[secrets.token_bytes(wire.CUDA_IPC_HANDLE_BYTES)] = storage
        return cache

    def export(self, cache: PagedKVCache) -> wire.CudaIpcCache:
        return export_cache(self.track(cache), driver=self)

    def allocation_range(self, ptr: int, device: torch.device) -> tuple[int, int]:
        self.calls.append(("allocation_range", ptr))
        for storage in self.allocations.values():
            if storage.data_ptr() <= ptr < storage.data_ptr() + storage.nbytes():
                return storage.data_ptr(), storage.nbytes()
        raise RuntimeError("CUDA_ERROR_NOT_FOUND (fake)")

    def export_handle(self, base: int, device: torch.device) -> bytes:
        self.calls.append(("export_handle", base))
        return next(h for h, s in self.allocations.items() if s.data_ptr() == base)

    def open_handle(self, handle: bytes, device: torch.device) -> int:
        self.calls.append(("open_handle", handle))
        if self.fail_open:
            raise RuntimeError("CUDA_ERROR_PEER_ACCESS_UNSUPPORTED (fake)")
        if handle not in self.allocations:
            raise RuntimeError("CUDA_ERROR_INVALID_VALUE (fake)")
        self.mapped.append(self.allocations[handle].data_ptr())
        return self.mapped[-1]

    def close_handle(self, ptr: int, device: torch.device) -> None:
        self.calls.append(("close_handle", ptr))
        self.mapped.remove(ptr)

    @property
    def opened(self) -> int:
        return sum(name == "open_handle" for name, _ in self.calls)


def make_cache(seed: int, layout: str = "LBHNC", device: str = "cpu") -> PagedKVCache:
    return make_paged_cache(layout, SHAPE, seed=seed, device=device)[1]


def block_of(cache: PagedKVCache, block_id: int) -> torch.Tensor:
    out = torch.empty(cache.block_bytes, dtype=torch.uint8, device=cache.device)
    gather_blocks(cache, [block_id], out)
    return out.cpu()


def fingerprint_of(cache: PagedKVCache) -> KVLayoutFingerprint:
    return make_fingerprint(
        num_layers=SHAPE.num_layers,
        num_kv_heads=SHAPE.num_heads,
        head_size=SHAPE.content // 2,
        block_size=SHAPE.block_size,
        page_bytes=cache.page_bytes,
    )


class SideChannel:
    """A prefill worker's real TransferServer over `prefill`; with `driver`, it writes into
    peers through CUDA IPC (faked on CPU, real on a GPU)."""

    def __init__(self, prefill: PagedKVCache, driver: IpcDriver | None) -> None:
        def gather(block_ids: list[int], out: torch.Tensor | None) -> torch.Tensor:
            if out is None:
                out = torch.empty(prefill.buffer_bytes(len(block_ids)), dtype=torch.uint8)
            gather_blocks(prefill, block_ids, out)
            if prefill.device.type == "cuda":
                torch.cuda.synchronize(prefill.device)
            return out

        self.registry = SendRegistry(lease_s=30)
        self.writer = CudaIpcWriter(prefill, driver=driver) if driver else None
        self.server = TransferServer(
            "127.0.0.1",
            0,
            self.registry,
            gather,
            fingerprint_of(prefill),
            prefill.block_bytes,
            ipc_write=self.writer.write if self.writer else None,
        )
        self.endpoint = f"tcp://127.0.0.1:{self.server.port}"

    def close(self) -> None:
        self.server.close()
        if self.writer is not None:
            self.writer.close()


def pull(endpoint: str, decode: PagedKVCache, ipc_cache, remote, local, transfer_id):
    """pull_blocks as the decode worker runs it: (bytes received, local ids scattered here)."""
    scattered: list[int] = []

    def scatter(first: int, data: torch.Tensor) -> None:
        ids = list(local[first : first + data.numel() // decode.block_bytes])
        scattered.extend(ids)
        scatter_blocks(decode, ids, data)

    received = pull_blocks(
        PullSpec(
            endpoint=endpoint,
            transfer_id=transfer_id,
            fingerprint=fingerprint_of(decode),
            remote_block_ids=tuple(remote),
            block_bytes=decode.block_bytes,
            ipc=ipc_cache,
            local_block_ids=tuple(local),
        ),
        scatter,
        timeout_s=5,
        unknown_transfer_grace_s=0.5,
        max_chunk_bytes=2 * decode.block_bytes,  # several chunks: ids split across reads
    )
    return received, scattered


def pull_from(channel: SideChannel, decode, ipc_cache, remote, local, transfer_id):
    channel.registry.add("req-" + transfer_id, transfer_id, list(remote))
    return pull(channel.endpoint, decode, ipc_cache, remote, local, transfer_id)


def assert_released(channel: SideChannel, outcome: SendOutcome, count: int = 1) -> None:
    """Every pulled transfer was released by the decode side (nothing left to the lease)."""
    finished = channel.registry.take_finished()
    assert len(finished) == count and len(channel.registry) == 0
    assert all(send.outcome == outcome for send in finished), finished


def lie(target: wire.CudaIpcCache, **changes) -> wire.CudaIpcCache:
    """target with some fields changed; `storage` changes apply to storages[0]."""
    storage = changes.pop("storage", {})
    storages = [msgspec.structs.replace(target.storages[0], **storage), *target.storages[1:]]
    return msgspec.structs.replace(target, storages=storages, **changes)
