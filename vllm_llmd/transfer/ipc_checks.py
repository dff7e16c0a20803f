"""Checks of a peer's CUDA IPC description (`messages.CudaIpcCache`), nothing trusted.

The copy kernels write to raw addresses of another process's memory, so every number of the
description is checked, in two steps:

- `check_description`, before anything is opened: each field's type, sign, bound and
  alignment, handle lengths, the layout against our own cache, segment ranges against the
  storages' claimed sizes, and the target block ids;
- `check_mapped`, once a handle is open: the storage's claimed range against the real size of
  the allocation the driver mapped (`cuda_driver.IpcDriver.allocation_range`).

Each failure is a ValueError naming the field (the server answers `bad_request`).
"""

from __future__ import annotations

from collections.abc import Sequence

from vllm_llmd.ops import PagedKVCache
from vllm_llmd.transfer.messages import CUDA_IPC_HANDLE_BYTES, CudaIpcCache, CudaIpcStorage

# No GPU allocation is near 256 TiB; the bound keeps every sum of offsets far inside int64
# (the kernels' base table) whatever a peer sends.
MAX_IPC_BYTES = 1 << 48
MAX_DEVICE_UUID_CHARS = 64


def check_description(
    target: CudaIpcCache, like: PagedKVCache, target_ids: Sequence[int], num_ids: int
) -> None:
    """Raise ValueError unless `target` describes a cache laid out as `like` whose segments fit
    in the storages it claims, and target_ids are num_ids distinct blocks of it."""
    if not isinstance(target.device_uuid, str) or len(target.device_uuid) > MAX_DEVICE_UUID_CHARS:
        raise ValueError(f"device_uuid must be a string of at most {MAX_DEVICE_UUID_CHARS} chars")
    align = like.dtype.itemsize
    page_bytes = _count("page_bytes", target.page_bytes, low=1)
    block_stride = _count("block_stride", target.block_stride, low=1)
    if (page_bytes, block_stride) != (like.page_bytes, like.block_stride):
        raise ValueError(
            f"the peer's pages ({page_bytes} bytes every {block_stride}) "
            f"differ from ours ({like.page_bytes} every {like.block_stride})"
        )
    num_blocks = _count("num_blocks", target.num_blocks, low=1)
    span = (num_blocks - 1) * block_stride + page_bytes  # bytes of one segment's blocks
    if span > MAX_IPC_BYTES:
        raise ValueError(f"num_blocks: {num_blocks} blocks span {span} bytes, over any GPU's")
    if not 1 <= len(target.storages) <= like.num_segments:
        raise ValueError(
            f"storages: {len(target.storages)} sent, expected 1 to {like.num_segments} "
            "(one per segment at most)"
        )
    for index, storage in enumerate(target.storages):
        _check_storage(f"storages[{index}]", storage, align)
    for name, values in (
        ("segment_storages", target.segment_storages),
        ("segment_offsets", target.segment_offsets),
    ):
        if len(values) != like.num_segments:
            raise ValueError(
                f"{name}: {len(values)} entries, but this cache's layout has "
                f"{like.num_segments} segments"
            )
    used = set()
    for segment, (index, offset) in enumerate(
        zip(target.segment_storages, target.segment_offsets, strict=True)
    ):
        index = _count(f"segment_storages[{segment}]", index, high=len(target.storages) - 1)
        offset = _count(f"segment_offsets[{segment}]", offset, multiple=align)
        used.add(index)
        size = target.storages[index].size_bytes
        if offset + span > size:
            raise ValueError(
                f"segment_offsets[{segment}]: {num_blocks} blocks from byte {offset} need "
                f"{offset + span} bytes, but storages[{index}] has {size}"
            )
    if len(used) != len(target.storages):
        unused = sorted(set(range(len(target.storages))) - used)
        raise ValueError(f"storages {unused} are used by no segment")
    _check_target_ids(target_ids, num_ids, num_blocks)


def check_mapped(name: str, storage: CudaIpcStorage, mapped_bytes: int) -> None:
    """Raise ValueError unless the storage lies inside the allocation as really mapped
    (mapped_bytes: from the mapped base to the allocation's end)."""
    end = storage.offset_bytes + storage.size_bytes
    if end > mapped_bytes:
        raise ValueError(
            f"{name}: bytes {storage.offset_bytes}..{end} of its allocation claimed, but the "
            f"allocation behind its handle has {mapped_bytes} bytes"
        )


def _check_storage(name: str, storage: CudaIpcStorage, align: int) -> None:
    if not isinstance(storage.handle, bytes) or len(storage.handle) != CUDA_IPC_HANDLE_BYTES:
        length = len(storage.handle) if isinstance(storage.handle, bytes) else "not bytes"
        raise ValueError(
            f"{name}.handle: a CUDA IPC handle has {CUDA_IPC_HANDLE_BYTES} bytes, got {length}"
        )
    offset = _count(f"{name}.offset_bytes", storage.offset_bytes, multiple=align)
    size = _count(f"{name}.size_bytes", storage.size_bytes, low=1, multiple=align)
    if offset + size > MAX_IPC_BYTES:
        raise ValueError(f"{name}: bytes {offset}..{offset + size} exceed any GPU's memory")


def _check_target_ids(target_ids: Sequence[int], num_ids: int, num_blocks: int) -> None:
    if len(target_ids) != num_ids:
        raise ValueError(f"{num_ids} blocks to write but {len(target_ids)} targets")
    for position, block_id in enumerate(target_ids):
        _count(f"ipc_block_ids[{position}]", block_id, high=num_blocks - 1)
    if len(set(target_ids)) != len(target_ids):
        raise ValueError("ipc_block_ids repeat a block: each target block is written once")


def _count(
    name: str, value: object, *, low: int = 0, high: int = MAX_IPC_BYTES, multiple: int = 1
) -> int:
    """value as a bounded int (bool is not one), or ValueError naming the field."""
    if type(value) is not int:
        raise ValueError(f"{name} must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} = {value} is outside {low}..{high}")
    if value % multiple:
        raise ValueError(f"{name} = {value} is not a multiple of {multiple} bytes")
    return value
