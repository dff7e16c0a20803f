"""The domain events a consumer of vLLM's KV-event stream works with.

These are our own types, not vLLM's: the router must run without vLLM, and vLLM's structs change
shape between releases (positional arrays, then tagged maps; new trailing fields). The decoder
(`decoder.py`) maps every wire form onto these. Block hashes are always `EventBlockHash` ints,
whether the engine sent ints or raw digests (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0).
"""

from __future__ import annotations

from typing import Any

import msgspec

from vllm_llmd.hashing import EventBlockHash

# Tier names vLLM uses in `medium` (GPU even on the CPU backend: it names the engine's own cache).
MEDIUM_GPU = "GPU"
MEDIUM_CPU = "CPU"
MEDIUM_STORAGE = "STORAGE"
# Ours: the tier every instance shares (LMCache). Pod-independent: a router counts a block
# there as held by every pod, not by the pod that published it.
MEDIUM_SHARED = "SHARED"


class BlockStored(msgspec.Struct, frozen=True, kw_only=True):
    """Full blocks entered a tier's prefix cache: one event per request, group and step."""

    block_hashes: tuple[EventBlockHash, ...]
    # hash of the block just before the first one; None at the start of a prefix
    parent_block_hash: EventBlockHash | None
    # tokens of all blocks in this event, concatenated (len == block_size * len(block_hashes))
    token_ids: tuple[int, ...]
    # tokens per block
    block_size: int
    medium: str | None = None
    lora_name: str | None = None
    # deprecated by vLLM in favour of lora_name; kept for old engines
    lora_id: int | None = None
    # one entry per block, untagged (LoRA name, salt, (mm id, offset), embeds digest)
    extra_keys: tuple[tuple[Any, ...] | None, ...] | None = None
    # KV-cache group, and that group's spec ("full_attention", "sliding_window", ...)
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    # "LOCAL" / "REMOTE" relative to the publisher
    locality: str | None = None
    # secondary-tier id, when an offloading tier made the event
    ownership: str | None = None
    session_id: str | None = None
    # vLLM 0.33 lookahead mode: the tokens after each block that joined its hash
    lookahead_token_ids: tuple[tuple[int, ...], ...] | None = None


class BlockRemoved(msgspec.Struct, frozen=True, kw_only=True):
    """Blocks left a tier (evicted). vLLM does not dedupe: count references, not a set."""

    block_hashes: tuple[EventBlockHash, ...]
    medium: str | None = None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(msgspec.Struct, frozen=True, kw_only=True):
    """The engine reset its prefix cache: forget every block of this source."""


Event = BlockStored | BlockRemoved | AllBlocksCleared


class EventBatch(msgspec.Struct, frozen=True, kw_only=True):
    """One published message: the events of one engine step, in order."""

    # publisher's wall clock (time.time()) when the step's events were taken
    ts: float
    events: tuple[Event, ...]
    data_parallel_rank: int | None = None
    # events in this batch the decoder could not read (counted, then skipped)
    num_malformed: int = 0
    # events of a type this decoder does not know (a newer vLLM), skipped
    num_unknown: int = 0
