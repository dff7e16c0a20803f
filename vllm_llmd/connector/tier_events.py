"""Our tiers' stores and evictions as vLLM KV events, on vLLM's own publisher.

The scheduler half returns these from `take_events`, so vLLM appends them to the same
`KVEventBatch` as its device-cache events, in order. One event per offloaded block: a `BlockStored`
carries its hash exactly as vLLM publishes hashes (`maybe_convert_block_hash`), its parent's,
its tokens, the block size and the medium (`CPU` for the host tier, `STORAGE` for disk); a
`BlockRemoved` names the hash and the medium. A block's tokens and parent travel with it as
`BlockInfo` text (`vllm_llmd/offload/block_info.py`).

The shared LMCache tier (medium `SHARED`, `shared_tier_events`) is announced per run of blocks,
from what its planner learned (`SharedTierChange`: lookup answers, finished stores).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import msgspec
from vllm.distributed.kv_events import (
    MEDIUM_CPU,
    MEDIUM_STORAGE,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVCacheEvent,
)
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

from vllm_llmd.events.model import MEDIUM_SHARED
from vllm_llmd.offload.block_info import BlockInfo
from vllm_llmd.offload.records import OffloadTier, TierEvent

if TYPE_CHECKING:
    from vllm_llmd.shared_tier.planner import SharedTierChange

MEDIUM_OF_TIER = {OffloadTier.HOST: MEDIUM_CPU, OffloadTier.DISK: MEDIUM_STORAGE}


_decoder = msgspec.json.Decoder(BlockInfo)


def shared_tier_events(changes: Iterable[SharedTierChange], block_size: int) -> list[KVCacheEvent]:
    """vLLM KV events of the shared tier's changes: one event per change (a run of blocks), as
    vLLM announces a request's blocks, since a hit re-announces its whole run each time."""
    out: list[KVCacheEvent] = []
    for change in changes:
        request = change.request
        first, end = change.first_block, min(change.end_block, len(request.block_hashes))
        if end <= first:
            continue
        hashes = [maybe_convert_block_hash(h) for h in request.block_hashes[first:end]]
        if not change.stored:
            out.append(BlockRemoved(block_hashes=hashes, medium=MEDIUM_SHARED, group_idx=0))
            continue
        parent = maybe_convert_block_hash(request.block_hashes[first - 1]) if first else None
        out.append(
            BlockStored(
                block_hashes=hashes,
                parent_block_hash=parent,
                token_ids=list(request.all_token_ids[first * block_size : end * block_size]),
                block_size=block_size,
                lora_id=None,
                medium=MEDIUM_SHARED,
                lora_name=request.lora_request.name if request.lora_request else None,
                group_idx=0,
            )
        )
    return out


def to_kv_events(events: Iterable[TierEvent], block_size: int) -> list[KVCacheEvent]:
    """vLLM KV events for tier events (stores without a readable BlockInfo are skipped)."""
    out: list[KVCacheEvent] = []
    for event in events:
        medium = MEDIUM_OF_TIER[event.tier]
        block_hash = maybe_convert_block_hash(event.key)
        if not event.stored:
            out.append(BlockRemoved(block_hashes=[block_hash], medium=medium, group_idx=0))
            continue
        try:
            info = _decoder.decode(event.info)
        except msgspec.DecodeError:
            continue  # written by something else: nothing honest to announce
        parent = maybe_convert_block_hash(bytes.fromhex(info.parent)) if info.parent else None
        out.append(
            BlockStored(
                block_hashes=[block_hash],
                parent_block_hash=parent,
                token_ids=info.token_ids,
                block_size=block_size,
                lora_id=None,
                medium=medium,
                lora_name=info.lora_name,
                group_idx=0,
            )
        )
    return out


def all_cleared() -> KVCacheEvent:
    return AllBlocksCleared()
