"""Copies of a range of KV heads of blocks, for reads between instances of unequal TP sizes.

In the layouts of `kv_layout.HEAD_SLICED_LAYOUTS` each segment of a `PagedKVCache` (a layer's
block, or a whole block of every layer) is, as bytes, `[rows, heads, head_bytes]`:

    *HNC: a layer's page is [H, N*C]      rows = 1 per layer, head_bytes = N*C bytes
    *NHC: a layer's page is [N, H, C]     rows = N per layer, head_bytes = C bytes

so heads [h0, h1) of a block are `rows` strided runs. A head-sliced buffer holds, for each
block id in the order given, each segment's rows in memory order, each row's heads h0..h1:

    buffer = [ block_ids[0]: segment 0 [row 0: h0..h1 | row 1: ...] | segment 1 ... | ... ]

Both sides lay a block's rows out alike (same layout, layers, block size), so a slice of a
prefill worker's heads lands in any head positions of a decode worker's blocks. The copies are
torch index_select / index_copy_ over strided views (CPU or CUDA): the CUDA kernels of `ops`
move whole pages only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_llmd.kv_layout import HEAD_SLICED_LAYOUTS, KVLayoutFingerprint
from vllm_llmd.ops.copy_stream import CopyStreams
from vllm_llmd.ops.paged_cache import PagedKVCache, check_block_ids

_WORD_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


class HeadSliceUnsupported(ValueError):
    """This cache's layout keeps a head's bytes of a block apart."""


class HeadSlicer:
    """Gathers and scatters head ranges of a paged KV cache's blocks."""

    def __init__(self, cache: PagedKVCache, fingerprint: KVLayoutFingerprint) -> None:
        layout, heads = fingerprint.layout, fingerprint.num_kv_heads
        if layout not in HEAD_SLICED_LAYOUTS:
            raise HeadSliceUnsupported(
                f"layout {layout!r} keeps a head's bytes apart; head slices need one of "
                f"{', '.join(HEAD_SLICED_LAYOUTS)}"
            )
        per_row = fingerprint.block_size if layout.endswith("NHC") else 1
        layer_page = fingerprint.page_bytes
        if heads <= 0 or layer_page % (heads * per_row) or cache.page_bytes % layer_page:
            raise HeadSliceUnsupported(
                f"a {layer_page}-byte page of {heads} heads does not split into head rows "
                f"of this cache's {cache.page_bytes}-byte segments"
            )
        self.cache = cache
        self.num_heads = heads
        self.head_bytes = layer_page // (heads * per_row)
        self.rows = cache.page_bytes // (heads * self.head_bytes)  # per segment
        self._views: dict[int, tuple[torch.Tensor, ...]] = {}
        # on CUDA a stream per copying thread: never behind the forward vLLM is running
        self._streams = CopyStreams(cache.device)

    def block_bytes(self, num_heads: int) -> int:
        """Bytes one block id takes in a buffer of num_heads heads."""
        return self.cache.num_segments * self.rows * num_heads * self.head_bytes

    def check_heads(self, heads: tuple[int, int]) -> str | None:
        """Why heads is no range of this cache's heads (None if it is)."""
        start, end = heads
        if not 0 <= start < end <= self.num_heads:
            return f"head range [{start}, {end}) is not within this worker's {self.num_heads} heads"
        return None

    def gather(
        self, block_ids: Sequence[int], heads: tuple[int, int], out: torch.Tensor | None
    ) -> torch.Tensor:
        """Heads of blocks into `out` (uint8, block_bytes * len(block_ids)) or a new buffer."""
        ids = self._checked(block_ids, heads, distinct=False)
        if out is None:
            pin = self.cache.device.type == "cuda"
            out = torch.empty(
                self.block_bytes(heads[1] - heads[0]) * len(ids), dtype=torch.uint8, pin_memory=pin
            )
        self._check_buffer(out, len(ids), heads)
        word = self._word(out)
        dst = self._as_buffer(out, word, len(ids), heads)
        with self._streams.copies():  # done when this returns: `out` is read next
            ids = ids.to(self.cache.device)
            for s, view in enumerate(self._segment_views(word)):
                dst[:, s].copy_(view[:, :, heads[0] : heads[1]].index_select(0, ids))
        return out

    def scatter(self, block_ids: Sequence[int], heads: tuple[int, int], src: torch.Tensor) -> None:
        """A buffer as `gather` fills it into heads of blocks (distinct ids)."""
        ids = self._checked(block_ids, heads, distinct=True)
        self._check_buffer(src, len(ids), heads)
        word = self._word(src)
        with self._streams.copies():  # done when this returns: `src` may be reused next
            source = self._as_buffer(src, word, len(ids), heads).to(self.cache.device)
            ids = ids.to(self.cache.device)
            for s, view in enumerate(self._segment_views(word)):
                view[:, :, heads[0] : heads[1]].index_copy_(0, ids, source[:, s])

    # ---- helpers -------------------------------------------------------------------------

    def _checked(
        self, block_ids: Sequence[int], heads: tuple[int, int], distinct: bool
    ) -> torch.Tensor:
        problem = self.check_heads(heads)
        if problem:
            raise ValueError(problem)
        return check_block_ids(self.cache, block_ids, distinct=distinct)

    def _check_buffer(self, buffer: torch.Tensor, num_ids: int, heads: tuple[int, int]) -> None:
        expected = self.block_bytes(heads[1] - heads[0]) * num_ids
        nbytes = buffer.numel() * buffer.element_size()
        if nbytes != expected or not buffer.is_contiguous():
            raise ValueError(f"a contiguous buffer of {expected} bytes expected, got {nbytes}")

    def _as_buffer(
        self, buffer: torch.Tensor, word: int, num_ids: int, heads: tuple[int, int]
    ) -> torch.Tensor:
        words = buffer.reshape(-1).view(torch.uint8).view(_WORD_DTYPES[word])
        count = heads[1] - heads[0]
        return words.view(
            num_ids, self.cache.num_segments, self.rows, count, self.head_bytes // word
        )

    def _word(self, buffer: torch.Tensor) -> int:
        """The widest integer every address and size allows (CPU copies move one per step)."""
        cache = self.cache
        values = [self.head_bytes, cache.block_stride, buffer.data_ptr(), *cache.base_addresses()]
        values += [storage.data_ptr() for storage in cache.storages]
        return next(w for w in (8, 4, 2, 1) if all(v % w == 0 for v in values))

    def _segment_views(self, word: int) -> tuple[torch.Tensor, ...]:
        """Per segment, [num_blocks, rows, heads, head words] over the cache's storage."""
        if word not in self._views:
            cache, dtype = self.cache, _WORD_DTYPES[word]
            head = self.head_bytes // word
            shape = (cache.num_blocks, self.rows, self.num_heads, head)
            strides = (cache.block_stride // word, self.num_heads * head, head, 1)
            self._views[word] = tuple(
                torch.empty(0, dtype=dtype, device=cache.device).set_(
                    storage, offset // word, shape, strides
                )
                for storage, offset in zip(cache.storages, cache.offsets, strict=True)
            )
        return self._views[word]
