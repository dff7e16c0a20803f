"""Shared-tier work of one engine step, from the scheduler half to every worker.

Token ranges are LMCache chunks: `start` and `end` are multiples of the chunk size, and
`token_ids` holds the request's prompt from token 0 at least to `end` (the server hashes the
whole prefix: a chunk's key depends on every token before it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm_llmd.connector.metadata import LLMDConnectorMetadata


@dataclass(frozen=True)
class SharedLoadSpec:
    """Load chunks [start, end) of a prompt; write blocks skip_blocks.. of them into block_ids."""

    request_id: str
    token_ids: tuple[int, ...]
    start: int
    end: int
    # leading blocks of the range already computed here (not written again)
    skip_blocks: int
    block_ids: tuple[int, ...]
    # prompt tokens this load provides (vLLM's external tokens for this part)
    num_tokens: int
    cache_salt: str = ""


@dataclass(frozen=True)
class SharedStoreSpec:
    """Store chunks [start, end) of a prompt, computed in block_ids (one per block, in order)."""

    request_id: str
    token_ids: tuple[int, ...]
    start: int
    end: int
    block_ids: tuple[int, ...]
    cache_salt: str = ""


@dataclass
class LLMDStepMetadata(LLMDConnectorMetadata):
    """LLMDConnectorMetadata plus this step's shared-tier loads and stores."""

    shared_loads: list[SharedLoadSpec] = field(default_factory=list)
    shared_stores: list[SharedStoreSpec] = field(default_factory=list)

    def is_empty(self) -> bool:
        return super().is_empty() and not (self.shared_loads or self.shared_stores)
