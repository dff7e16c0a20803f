"""TEMPORARY stand-in for vllm_llmd.ops until the copy-ops module lands (same semantics)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedKVCache:
    pages: list[torch.Tensor]  # per layer: uint8 [num_blocks, page_bytes] views
    num_blocks: int
    page_bytes: int

    @property
    def num_layers(self) -> int:
        return len(self.pages)

    @classmethod
    def from_layers(cls, kv_caches: dict[str, torch.Tensor]) -> PagedKVCache:
        pages, seen = [], set()
        for t in kv_caches.values():
            key = (t.data_ptr(), t.stride(0))
            if key in seen:
                continue
            seen.add(key)
            elem = t.element_size()
            assert t[0].is_contiguous()
            page = t[0].numel() * elem
            base = torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())
            pages.append(
                base.as_strided(
                    (t.shape[0], page), (t.stride(0) * elem, 1), t.storage_offset() * elem
                )
            )
        return cls(pages, pages[0].shape[0], pages[0].shape[1])


def gather_blocks(cache: PagedKVCache, block_ids: list[int]) -> torch.Tensor:
    idx = torch.tensor(block_ids, dtype=torch.long)
    return torch.stack([p.index_select(0, idx) for p in cache.pages], dim=1).reshape(-1)


def scatter_blocks(cache: PagedKVCache, block_ids: list[int], data: torch.Tensor) -> None:
    idx = torch.tensor(block_ids, dtype=torch.long)
    view = data.view(len(block_ids), cache.num_layers, cache.page_bytes)
    for layer, p in enumerate(cache.pages):
        p.index_copy_(0, idx, view[:, layer])
