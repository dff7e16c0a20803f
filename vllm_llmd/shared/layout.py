"""LMCache's chunk object for a vLLM CPU KV cache, and the copies between it and our staging.

vLLM's CPU backend hands each layer as `[num_blocks, num_kv_heads, block_size, 2*head_size]`:
one (block, head) page holds K rows then V rows. LMCache reads that as its format
`EngineKVFormat.NL_X_NB_NH_BS_CS` (single plane, "fused K/V per token") and stores one chunk of
`chunk_tokens` tokens as one object, token rows per layer, heads side by side:

    chunk object  [num_layers, chunk_tokens, num_kv_heads * C]      C = 2 * head_size
        viewed as [num_layers, blocks_per_chunk, block_size, num_kv_heads, C]

`gather_blocks` fills a staging buffer block by block, layers in order, pages in memory order:

    staging       [num_blocks, num_layers, num_kv_heads, block_size, C]

so a chunk is one permuted copy of blocks_per_chunk staging blocks (dims 1,0,3,2,4), and back.
These are the bytes LMCache's own vLLM connector (LMCacheMPConnector) writes from a CPU worker:
instances of both connectors share one namespace (tests/test_shared_tier.py compares the bytes).
The bytes depend on block_size (a "row" is a position in a page, not a token): instances that
share a server or its Redis must use one block size.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from vllm_llmd.ops import PagedKVCache


@dataclass(frozen=True)
class ChunkLayout:
    """Geometry of one worker's chunk objects."""

    num_layers: int
    num_heads: int
    block_size: int
    # elements per token per head: K and V of one head (2 * head_size)
    content: int
    dtype: torch.dtype
    blocks_per_chunk: int

    @property
    def chunk_tokens(self) -> int:
        return self.blocks_per_chunk * self.block_size

    @property
    def hidden_dim(self) -> int:
        """LMCache's hidden_dim_size: elements of one row of one layer."""
        return self.num_heads * self.content

    @property
    def chunk_shape(self) -> tuple[int, int, int]:
        return (self.num_layers, self.chunk_tokens, self.hidden_dim)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of all layers in a staging buffer."""
        elem = torch.empty(0, dtype=self.dtype).element_size()
        return self.num_layers * self.num_heads * self.block_size * self.content * elem

    @property
    def chunk_bytes(self) -> int:
        return self.blocks_per_chunk * self.block_bytes

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @classmethod
    def from_kv_caches(
        cls, kv_caches: Mapping[str, torch.Tensor], cache: PagedKVCache, chunk_tokens: int
    ) -> ChunkLayout:
        """The layout of vLLM's per-layer tensors; ValueError if LMCache cannot share it."""
        tensors = list(kv_caches.values())
        first = tensors[0]
        if first.dim() != 4:
            raise ValueError(
                f"the shared tier supports vLLM's CPU KV layout [blocks, heads, block_size, "
                f"2*head_size] per layer; this cache has per-layer shape {tuple(first.shape)}"
            )
        _, num_heads, block_size, content = first.shape
        if chunk_tokens % block_size:
            raise ValueError(
                f"shared_tier_chunk_tokens {chunk_tokens} is not a multiple of the block size "
                f"{block_size}"
            )
        for name, tensor in kv_caches.items():
            if tensor.shape[1:] != first.shape[1:] or not tensor[0].is_contiguous():
                raise ValueError(
                    f"layer {name}: a block's page is not one contiguous [heads, block_size, "
                    f"2*head_size] array; the shared tier supports vLLM's CPU KV layout only"
                )
        layout = cls(
            num_layers=len(tensors),
            num_heads=int(num_heads),
            block_size=int(block_size),
            content=int(content),
            dtype=first.dtype,
            blocks_per_chunk=chunk_tokens // block_size,
        )
        if len(cache.layer_names) != len(tensors) or cache.block_bytes != layout.block_bytes:
            raise ValueError(
                "the shared tier needs one page per layer per block (no shared layers)"
            )
        return layout

    # ---- copies --------------------------------------------------------------------------

    def _staging(self, staging: torch.Tensor, num_blocks: int) -> torch.Tensor:
        dims = (num_blocks, self.num_layers, self.num_heads, self.block_size, self.content)
        return staging.view(torch.uint8).view(self.dtype).view(dims)

    def _chunk(self, chunk: torch.Tensor) -> torch.Tensor:
        dims = (self.num_layers, self.blocks_per_chunk, self.block_size, self.num_heads)
        return chunk.view(*dims, self.content)

    def to_chunk(self, staging: torch.Tensor, chunk: torch.Tensor) -> None:
        """Copy blocks_per_chunk staged blocks (uint8) into one chunk object."""
        blocks = self._staging(staging, self.blocks_per_chunk)
        self._chunk(chunk).copy_(blocks.permute(1, 0, 3, 2, 4))

    def from_chunk(self, chunk: torch.Tensor, staging: torch.Tensor, first: int = 0) -> None:
        """Copy blocks first.. of one chunk object into staging (uint8, those blocks only)."""
        num_blocks = staging.numel() * staging.element_size() // self.block_bytes
        assert 0 <= first and first + num_blocks <= self.blocks_per_chunk, (first, num_blocks)
        rows = self._chunk(chunk)[:, first : first + num_blocks]
        self._staging(staging, num_blocks).copy_(rows.permute(1, 0, 3, 2, 4))
