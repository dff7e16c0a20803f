"""The torch path of block copies: one index_select / index_copy_ over integer views of pages.

Used on CPU, and on CUDA when the kernels cannot run. The pages are viewed as the widest
integer every address and size allows (int64 on aligned caches: CPU index_copy_ moves one
element per step, so 8-byte words run ~3x faster than bytes). When all segments sit in one
storage at equal spacing (vLLM's one allocation), one strided view [blocks, segments, words]
covers the cache and each copy is a single torch call; otherwise one call per segment.

Callers check ids and buffers first (paged_cache.check_*); on CUDA the copies are enqueued on
the current stream, as the kernels are.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from vllm_llmd.ops.paged_cache import PagedKVCache

_WORD_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


@dataclass(frozen=True)
class _Views:
    # [num_blocks, num_segments, page words] when the segments are equally spaced in one storage
    stacked: torch.Tensor | None
    # [num_blocks, page words] per segment
    segments: tuple[torch.Tensor, ...]


# Per cache and word size; dropped with the cache.
_VIEWS: weakref.WeakKeyDictionary[PagedKVCache, dict[int, _Views]] = weakref.WeakKeyDictionary()


def gather(cache: PagedKVCache, ids: torch.Tensor, out: torch.Tensor) -> None:
    """out[i, s, :] = page of segment s of block ids[i] (ids: checked CPU int64)."""
    word = _word_bytes(cache, out)
    views = _views(cache, word)
    ids = ids.to(cache.device, non_blocking=True)
    dst = _as_words(out, word).view(len(ids), cache.num_segments, -1)
    if views.stacked is not None and out.device == cache.device:
        torch.index_select(views.stacked, 0, ids, out=dst)
    elif views.stacked is not None:  # e.g. CUDA cache -> pinned host buffer
        dst.copy_(views.stacked.index_select(0, ids), non_blocking=True)
    else:
        for s, segment in enumerate(views.segments):
            dst[:, s].copy_(segment.index_select(0, ids), non_blocking=True)


def scatter(cache: PagedKVCache, ids: torch.Tensor, src: torch.Tensor) -> None:
    """page of segment s of block ids[i] = src[i, s, :] (ids: checked, distinct, CPU int64)."""
    word = _word_bytes(cache, src)
    views = _views(cache, word)
    ids = ids.to(cache.device, non_blocking=True)
    source = _as_words(src, word).view(len(ids), cache.num_segments, -1)
    source = source.to(cache.device, non_blocking=True)
    if views.stacked is not None:
        views.stacked.index_copy_(0, ids, source)
    else:
        for s, segment in enumerate(views.segments):
            segment.index_copy_(0, ids, source[:, s])


def _word_bytes(cache: PagedKVCache, buffer: torch.Tensor) -> int:
    values = [cache.page_bytes, cache.block_stride, buffer.data_ptr()]
    values += [st.data_ptr() for st in cache.storages] + cache.base_addresses()
    for word in (8, 4, 2):
        if all(value % word == 0 for value in values):
            return word
    return 1


def _as_words(buffer: torch.Tensor, word: int) -> torch.Tensor:
    return buffer.reshape(-1).view(torch.uint8).view(_WORD_DTYPES[word])


def _views(cache: PagedKVCache, word: int) -> _Views:
    per_word = _VIEWS.setdefault(cache, {})
    if word not in per_word:
        per_word[word] = _make_views(cache, word)
    return per_word[word]


def _make_views(cache: PagedKVCache, word: int) -> _Views:
    dtype = _WORD_DTYPES[word]
    page, stride = cache.page_bytes // word, cache.block_stride // word
    segments = tuple(
        torch.empty(0, dtype=dtype, device=cache.device).set_(
            storage, offset // word, (cache.num_blocks, page), (stride, 1)
        )
        for storage, offset in zip(cache.storages, cache.offsets, strict=True)
    )
    return _Views(_stacked(cache, word), segments)


def _stacked(cache: PagedKVCache, word: int) -> torch.Tensor | None:
    offsets = cache.offsets
    step = offsets[1] - offsets[0] if len(offsets) > 1 else cache.page_bytes
    one_storage = all(st.data_ptr() == cache.storages[0].data_ptr() for st in cache.storages)
    evenly = all(off == offsets[0] + s * step for s, off in enumerate(offsets))
    if not (one_storage and evenly and step > 0):
        return None
    # from_layers checked that no two pages overlap, so index_copy_ into it is well defined.
    return torch.empty(0, dtype=_WORD_DTYPES[word], device=cache.device).set_(
        cache.storages[0],
        offsets[0] // word,
        (cache.num_blocks, len(offsets), cache.page_bytes // word),
        (cache.block_stride // word, step // word, 1),
    )
