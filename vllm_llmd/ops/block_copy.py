"""gather_blocks / scatter_blocks / copy_blocks: the one entry point for block copies, and the
path choice.

Both check their inputs before any byte moves, then run either the CUDA kernels (one launch
for all blocks of all layers) or the torch path, with the same semantics and buffer order
(see paged_cache). The mode comes from the `mode` argument, else VLLM_LLMD_COPY_MODE, else
"auto": kernels when the cache is on CUDA, the buffer is on its device or pinned, and the
kernels compiled; torch otherwise. Which path runs, and why, is logged once per reason.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from vllm_llmd.log import get_logger
from vllm_llmd.ops import cuda_copy, torch_copy
from vllm_llmd.ops.paged_cache import (
    PagedKVCache,
    as_paged_cache,
    check_block_ids,
    check_buffer,
    check_same_pages,
)

logger = get_logger(__name__)

CopyMode = Literal["auto", "cuda", "torch"]
COPY_MODE_ENV = "VLLM_LLMD_COPY_MODE"
_MODES = ("auto", "cuda", "torch")
_logged: set[str] = set()

BlockIds = Sequence[int] | torch.Tensor
Cache = PagedKVCache | Mapping[str, torch.Tensor]


def gather_blocks(
    cache: Cache, block_ids: BlockIds, out: torch.Tensor, *, mode: CopyMode | None = None
) -> None:
    """Copy blocks of every layer into one contiguous buffer.

    Args:
        cache: a PagedKVCache, or the dict of per-layer KV tensors vLLM hands
            register_kv_caches (described anew on each call: build the PagedKVCache once).
        block_ids: ids of the blocks to copy, in buffer order; repeats are allowed.
        out: contiguous, `cache.buffer_bytes(len(block_ids))` bytes, of the cache's dtype or
            uint8/int8; on the cache's device or on the CPU (pinned, for the kernels).
        mode: "auto", "cuda" or "torch"; default: $VLLM_LLMD_COPY_MODE, else "auto".

    On CUDA the copy is enqueued on the current stream: synchronise before reading `out`
    on the host.
    """
    cache = as_paged_cache(cache)
    ids = check_block_ids(cache, block_ids, distinct=False)
    check_buffer(cache, out, len(ids), "out")
    if len(ids) == 0:
        return
    if _use_kernels(cache, out, mode):
        cuda_copy.kernels_for(cache.device).copy(cache, ids, out, gather=True)
    else:
        torch_copy.gather(cache, ids, out)


def scatter_blocks(
    cache: Cache, block_ids: BlockIds, src: torch.Tensor, *, mode: CopyMode | None = None
) -> None:
    """Copy a contiguous buffer (as gather_blocks fills it) into blocks of every layer.

    Args as gather_blocks, with `src` read instead of `out` written. block_ids must be
    distinct. On CUDA the copy is enqueued on the current stream: a host `src` must stay
    unchanged until the stream passes it.
    """
    cache = as_paged_cache(cache)
    ids = check_block_ids(cache, block_ids, distinct=True)
    check_buffer(cache, src, len(ids), "src")
    if len(ids) == 0:
        return
    if _use_kernels(cache, src, mode):
        cuda_copy.kernels_for(cache.device).copy(cache, ids, src, gather=False)
    else:
        torch_copy.scatter(cache, ids, src)


def copy_blocks(
    src: Cache,
    src_ids: BlockIds,
    dst: Cache,
    dst_ids: BlockIds,
    *,
    mode: CopyMode | None = None,
) -> None:
    """Copy blocks of every layer from one cache into another of the same layout, page to
    page: block dst_ids[i] of dst becomes block src_ids[i] of src.

    With the kernels one pass over the bytes and no buffer (a peer's cache opened through
    CUDA IPC, another cache of this worker); the torch path goes through a buffer on src's
    device. dst_ids must be distinct, src_ids may repeat. On CUDA the copy is enqueued on the
    current stream.
    """
    src, dst = as_paged_cache(src), as_paged_cache(dst)
    check_same_pages(src, dst)
    source_ids = check_block_ids(src, src_ids, distinct=False)
    target_ids = check_block_ids(dst, dst_ids, distinct=True)
    if len(source_ids) != len(target_ids):
        raise ValueError(
            f"{len(source_ids)} source blocks but {len(target_ids)} destination blocks: "
            "pass one destination per source block"
        )
    if len(source_ids) == 0:
        return
    if _use_kernels(src, dst, mode):
        cuda_copy.kernels_for(src.device).copy_between(src, source_ids, dst, target_ids)
    else:
        nbytes = src.buffer_bytes(len(source_ids))
        buffer = torch.empty(nbytes, dtype=torch.uint8, device=src.device)
        torch_copy.gather(src, source_ids, buffer)
        torch_copy.scatter(dst, target_ids, buffer)


def resolve_mode(mode: CopyMode | None = None) -> CopyMode:
    """The mode argument, else $VLLM_LLMD_COPY_MODE, else "auto"; ValueError if unknown."""
    chosen = mode if mode is not None else os.environ.get(COPY_MODE_ENV, "auto")
    if chosen not in _MODES:
        source = "mode" if mode is not None else COPY_MODE_ENV
        raise ValueError(f"{source}={chosen!r} is not a copy mode: use one of {_MODES}")
    return chosen  # type: ignore[return-value]


def _use_kernels(
    cache: PagedKVCache, other: torch.Tensor | PagedKVCache, mode: CopyMode | None
) -> bool:
    """Whether a copy between cache and `other` (a buffer, or a second cache) runs the kernels."""
    chosen = resolve_mode(mode)
    if chosen == "torch":
        _log_once(f"block copies use the torch path ({COPY_MODE_ENV} or mode='torch')")
        return False
    reason = _why_not_kernels(cache, other)
    if reason is None:
        _log_once(f"block copies use the CUDA kernels on {cache.device}")
        return True
    if chosen == "cuda":
        raise ValueError(f"mode 'cuda' cannot run: {reason}")
    _log_once(f"block copies use the torch path: {reason}")
    return False


def _why_not_kernels(cache: PagedKVCache, other: torch.Tensor | PagedKVCache) -> str | None:
    if cache.device.type != "cuda":
        return f"the cache is on {cache.device}"
    if isinstance(other, PagedKVCache):
        if other.device != cache.device:
            return f"the caches are on {cache.device} and {other.device}"
    elif other.device.type == "cpu" and not other.is_pinned():
        return "the buffer is in pageable host memory (allocate it with pin_memory=True)"
    try:
        cuda_copy.kernels_for(cache.device)
    except Exception as err:
        return f"the kernels did not compile or load ({err})"
    return None


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.info(message)
