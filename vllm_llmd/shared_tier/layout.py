"""LMCache's chunk object for a vLLM KV cache, and the copies between it and our staging.

vLLM (0.32+) hands each layer as a logical `[num_blocks, num_kv_heads, block_size, C]` view,
C = K and V of one head (`2*head_size`), whose physical page order is the KV cache layout:
`LBHNC` (a block's page is `[heads, block_size, C]`: vLLM's CPU backend, and GPU on request)
or `LBNHC` (`[block_size, heads, C]`: GPU attention backends' default). LMCache reads these as
its single-plane formats `NL_X_NB_NH_BS_CS` and `NL_X_NB_BS_NH_CS` ("fused K/V per token") and
stores a chunk of `chunk_tokens` tokens as one object, one row per page row, heads side by side:

    chunk object  [num_layers, chunk_tokens, num_kv_heads * C]
        viewed as [num_layers, blocks_per_chunk, block_size, num_kv_heads, C]

`gather_blocks` fills a staging buffer block by block, layers in order, pages in memory order:

    staging       [num_blocks, num_layers, page]    page = [H, N, C] (LBHNC) | [N, H, C] (LBNHC)

so a chunk is one permuted copy of blocks_per_chunk staging blocks, and back. These are the
bytes LMCache's own code writes for the same blocks (tests/test_shared_tier_lmcache.py compares them
with LMCache's gather for both page orders). On CUDA the staging buffer is pinned host memory
(the copy kernels move the blocks; the permutation runs on the CPU, where the chunk lives).
With LBHNC a "row" is a position in a head's page, not a token (vLLM's CPU attention packs a
page as K rows then V rows), so the bytes depend on block_size: instances that share a server
or its Redis must use one block size and one layout (neither is in LMCache's key).
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
    # physical order of one block's page: "HNC" (layout LBHNC) or "NHC" (LBNHC)
    page_order: str = "HNC"

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
        page_order = _page_order(first)
        for name, tensor in kv_caches.items():
            if tensor.shape[1:] != first.shape[1:] or _page_order(tensor) != page_order:
                raise ValueError(
                    f"layer {name}: a block's page is not one contiguous [heads, block_size, C] "
                    "or [block_size, heads, C] array (KV cache layouts LBHNC, LBNHC and their "
                    "block-outermost forms are supported)"
                )
        layout = cls(
            num_layers=len(tensors),
            num_heads=int(num_heads),
            block_size=int(block_size),
            content=int(content),
            dtype=first.dtype,
            blocks_per_chunk=chunk_tokens // block_size,
            page_order=page_order,
        )
        if len(cache.layer_names) != len(tensors) or cache.block_bytes != layout.block_bytes:
            raise ValueError(
                "the shared tier needs one page per layer per block (no shared layers)"
            )
        return layout

    # ---- copies --------------------------------------------------------------------------

    def _staging(self, staging: torch.Tensor, num_blocks: int) -> torch.Tensor:
        """Staged blocks as [blocks, layers, N, H, C] (a view whatever the page order)."""
        if self.page_order == "HNC":
            dims = (num_blocks, self.num_layers, self.num_heads, self.block_size, self.content)
            return staging.view(torch.uint8).view(self.dtype).view(dims).transpose(2, 3)
        dims = (num_blocks, self.num_layers, self.block_size, self.num_heads, self.content)
        return staging.view(torch.uint8).view(self.dtype).view(dims)

    def _chunk(self, chunk: torch.Tensor) -> torch.Tensor:
        """A chunk object as [blocks, layers, N, H, C] (a view)."""
        dims = (self.num_layers, self.blocks_per_chunk, self.block_size, self.num_heads)
        return chunk.view(*dims, self.content).transpose(0, 1)

    def to_chunk(self, staging: torch.Tensor, chunk: torch.Tensor) -> None:
        """Copy blocks_per_chunk staged blocks (uint8, host memory) into one chunk object."""
        self._chunk(chunk).copy_(self._staging(staging, self.blocks_per_chunk))

    def from_chunk(self, chunk: torch.Tensor, staging: torch.Tensor, first: int = 0) -> None:
        """Copy blocks first.. of one chunk object into staging (uint8, those blocks only)."""
        num_blocks = staging.numel() * staging.element_size() // self.block_bytes
        assert 0 <= first and first + num_blocks <= self.blocks_per_chunk, (first, num_blocks)
        rows = self._chunk(chunk)[first : first + num_blocks]
        self._staging(staging, num_blocks).copy_(rows)


def _page_order(layer: torch.Tensor) -> str | None:
    """ "HNC" or "NHC" when one block's page of this [B, H, N, C] view is contiguous in that
    order, else None."""
    _, heads, tokens, content = layer.shape
    stride = layer.stride()
    if stride[3] != 1:
        return None
    if stride[2] == content and stride[1] == tokens * content:
        return "HNC"
    if stride[1] == content and stride[2] == heads * content:
        return "NHC"
    return None
