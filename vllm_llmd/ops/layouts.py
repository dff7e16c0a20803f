"""KV caches laid out as vLLM lays them out, for tests and benchmarks of the block copies.

vLLM's physical order is a permutation of the logical [L, B, H, N, C] (layers, blocks, KV
heads, tokens per block, content), named by a KVCacheLayout string ("LBHNC", "BLNHC", ...);
every layer gets a view [B, H, N, C] of one allocation (vllm-connector-api.md section 9).
`allocate_kv_caches` builds that dict over random bytes, optionally starting at an odd byte
offset, and `block_bytes` reads one block of one layer in memory order: what a buffer of
gather_blocks holds for it, found by plain indexing (an independent reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOGICAL = "LBHNC"
LAYOUTS = ("LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC")


@dataclass(frozen=True)
class KVCacheShape:
    num_layers: int
    num_blocks: int
    num_heads: int
    block_size: int  # tokens per block
    content: int  # C: K and V of one token of one head (2 * head_size), in elements


@dataclass(frozen=True)
class AllocatedKVCache:
    layout: str
    physical: torch.Tensor  # the allocation, dims in layout order
    kv_caches: dict[str, torch.Tensor]  # "layers.{l}" -> [B, H, N, C], as vLLM hands it

    def block_bytes(self, layer: int, block: int) -> torch.Tensor:
        """uint8 bytes of one block of one layer, in memory order."""
        return self._block(layer, block).contiguous().view(torch.uint8).reshape(-1)

    def write_block(self, layer: int, block: int, data: torch.Tensor) -> None:
        """Overwrite one block of one layer with uint8 bytes in memory order."""
        page = self._block(layer, block).view(torch.uint8)
        page.copy_(data.view(page.shape))

    def storage_bytes(self) -> torch.Tensor:
        """A copy of the whole allocation as uint8, offset bytes included."""
        storage = self.physical.untyped_storage()
        return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage).clone()

    def _block(self, layer: int, block: int) -> torch.Tensor:
        # The remaining dims stay in layout order, so a flat copy is in memory order.
        page = self.physical.select(self.layout.index("L"), layer)
        return page.select(self.layout.replace("L", "").index("B"), block)


def allocate_kv_caches(
    layout: str,
    shape: KVCacheShape,
    dtype: torch.dtype = torch.bfloat16,
    *,
    device: torch.device | str = "cpu",
    offset_bytes: int = 0,
    generator: torch.Generator | None = None,
) -> AllocatedKVCache:
    """One allocation in `layout`, filled with random bytes, starting offset_bytes in.

    offset_bytes must be a multiple of dtype's size (torch cannot view it otherwise); odd
    offsets need a 1-byte dtype (uint8/int8, e.g. fp8 stored as bytes).
    """
    if sorted(layout) != sorted(LOGICAL):
        raise ValueError(f"layout {layout!r} is not a permutation of {LOGICAL}")
    elem = torch.empty(0, dtype=dtype).element_size()
    if offset_bytes % elem:
        raise ValueError(f"offset_bytes={offset_bytes} is not a multiple of {dtype}'s {elem} B")
    sizes = dict(zip(LOGICAL, _sizes(shape), strict=True))
    dims = [sizes[letter] for letter in layout]
    nbytes = elem * torch.Size(dims).numel()
    raw = torch.randint(0, 256, (offset_bytes + nbytes,), dtype=torch.uint8, generator=generator)
    raw = raw.to(device)
    physical = raw[offset_bytes:].view(dtype).view(dims)
    logical = physical.permute([layout.index(letter) for letter in LOGICAL])
    kv_caches = {f"layers.{layer}": logical[layer] for layer in range(shape.num_layers)}
    return AllocatedKVCache(layout, physical, kv_caches)


def _sizes(shape: KVCacheShape) -> tuple[int, ...]:
    return (shape.num_layers, shape.num_blocks, shape.num_heads, shape.block_size, shape.content)
