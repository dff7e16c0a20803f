"""Shared-tier work of one engine step, from the scheduler half to every worker.

Token ranges are LMCache chunks: `start` and `end` are multiples of the chunk size, and
`token_ids` holds the request's prompt from token 0 at least to `end` (the server hashes the
whole prefix: a chunk's key depends on every token before it).
"""

from __future__ import annotations

from dataclasses import dataclass


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

    @property
    def key(self) -> bytes:
        """Names this store in the workers' reports (a request stores each range once)."""
        return f"{self.request_id}@{self.start}".encode()
