"""Objects many test modules build: one definition each, with defaults and overrides.

- `make_fingerprint()`: the small float32 layout the scheduler-, worker- and tier-level unit
  tests share (2 layers, 2 KV heads of 16, 32-token blocks, one worker).
- `make_request(...)`: a real vLLM `Request` (vLLM's own block hasher, optional
  `kv_transfer_params`), as the connector's scheduler half receives it.
- `remote_prefill_params(prompt)`: the kv_transfer_params a prefill instance hands a decode one.
- `make_scheduler(...)`: the connector's scheduler half with the tiers a test asks for.
- `make_paged_cache(...)`: random KV caches in a layout, and the `PagedKVCache` over them.
- `vllm_block_stored(hashes)` / `vllm_stored_batch(hashes)`: vLLM's own `BlockStored` event of
  16-token blocks (and a batch of it), as its publisher sends them.

vLLM and torch are imported inside the functions that need them, so that modules using only
the fingerprint do not pay for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vllm_llmd.kv_layout import KVLayoutFingerprint

if TYPE_CHECKING:
    import torch
    from vllm.v1.request import Request

    from vllm_llmd.connector.config import LLMDConnectorConfig
    from vllm_llmd.connector.scheduler import LLMDConnectorScheduler
    from vllm_llmd.ops import PagedKVCache
    from vllm_llmd.ops.layouts import AllocatedKVCache, KVCacheShape
    from vllm_llmd.shared_tier.planner import SharedTierPlanner

BLOCK = 32


def make_fingerprint(**overrides: Any) -> KVLayoutFingerprint:
    """The shared test layout; keyword arguments replace its fields."""
    fields: dict[str, Any] = {
        "model": "m",
        "dtype": "float32",
        "num_layers": 2,
        "num_kv_heads": 2,
        "head_size": 16,
        "block_size": BLOCK,
        "layout": "LBHNC",
        "tensor_parallel_size": 1,
        "page_bytes": 4096,
    }
    fields.update(overrides)
    return KVLayoutFingerprint(**fields)


def make_request(
    request_id: str,
    prompt: Sequence[int],
    kv_transfer_params: dict | None = None,
    *,
    max_tokens: int = 4,
    block_size: int | None = BLOCK,
) -> Request:
    """A vLLM Request for prompt; block_size None: without vLLM's block hasher."""
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.request import Request

    extra = {"kv_transfer_params": kv_transfer_params} if kv_transfer_params else None
    hasher = None
    if block_size is not None:
        kv_cache_utils.init_none_hash(sha256)
        hasher = kv_cache_utils.get_request_block_hasher(block_size, sha256)
    sampling = SamplingParams(max_tokens=max_tokens, extra_args=extra)
    return Request(request_id, list(prompt), sampling, None, block_hasher=hasher)


def remote_prefill_params(prompt: Sequence[int], **changes: Any) -> dict:
    """Valid kv_transfer_params of a prefill of prompt (4 blocks held on engine-p); keyword
    arguments replace wire fields (e.g. llmd_ports=[])."""
    from vllm_llmd.transfer.params import RemotePrefillParams, prompt_digest

    params = RemotePrefillParams(
        engine_id="engine-p",
        request_id="req-p",
        host="10.0.0.5",
        ports=(5701,),
        block_ids=(7, 8, 9, 10),
        num_tokens=len(prompt),
        transfer_id="t" * 32,
        fingerprint=make_fingerprint(),
        prompt_digest=prompt_digest(list(prompt)),
    ).to_dict()
    params.update(changes)
    return params


def make_scheduler(
    *,
    engine_id: str = "engine-d",
    config: LLMDConnectorConfig | None = None,
    producer: bool = False,
    consumer: bool = False,
    host_slots: int = 0,
    disk_blocks: int = 0,
    staging_slots: int = 0,
    shared: SharedTierPlanner | None = None,
    publish_events: bool = False,
) -> LLMDConnectorScheduler:
    """The scheduler half; host_slots > 0 adds an offload tier (a real OffloadManager)."""
    from vllm_llmd.connector.config import LLMDConnectorConfig
    from vllm_llmd.connector.scheduler import LLMDConnectorScheduler
    from vllm_llmd.offload.manager import OffloadManager
    from vllm_llmd.offload.planner import OffloadPlanner

    offload = None
    if host_slots:
        manager = OffloadManager(host_slots, disk_blocks, num_staging_slots=staging_slots)
        offload = OffloadPlanner(manager, BLOCK, num_workers=1, store_decode=False)
        config = config or LLMDConnectorConfig(host_offload_bytes=1 << 20)
    return LLMDConnectorScheduler(
        config or LLMDConnectorConfig(),
        engine_id,
        make_fingerprint(),
        is_producer=producer,
        is_consumer=consumer,
        offload=offload,
        shared=shared,
        publish_events=publish_events,
    )


def make_paged_cache(
    layout: str,
    shape: KVCacheShape,
    dtype: torch.dtype | None = None,
    *,
    seed: int | None = None,
    device: str = "cpu",
) -> tuple[AllocatedKVCache, PagedKVCache]:
    """Random KV caches in layout (dtype default float32; seed: reproducible bytes), and the
    PagedKVCache the copies use over them."""
    import torch

    from vllm_llmd.ops import PagedKVCache
    from vllm_llmd.ops.layouts import allocate_kv_caches

    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    allocated = allocate_kv_caches(
        layout, shape, dtype or torch.float32, generator=generator, device=device
    )
    return allocated, PagedKVCache.from_layers(allocated.kv_caches)


def vllm_block_stored(hashes: list[int], medium: str | None = "GPU") -> Any:
    """vLLM's `BlockStored` of `hashes`, 16-token blocks, no parent (the first of a prompt)."""
    from vllm.distributed import kv_events

    return kv_events.BlockStored(
        block_hashes=hashes,
        parent_block_hash=None,
        token_ids=list(range(16 * len(hashes))),
        block_size=16,
        lora_id=None,
        medium=medium,
        lora_name=None,
    )


def vllm_stored_batch(hashes: list[int], medium: str | None = "GPU") -> Any:
    """A `KVEventBatch` of one `vllm_block_stored`, stamped now."""
    import time

    from vllm.distributed import kv_events

    return kv_events.KVEventBatch(ts=time.time(), events=[vllm_block_stored(hashes, medium)])
