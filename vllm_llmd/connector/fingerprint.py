"""The engine compatibility fingerprint both halves (and both instances) compute alike."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm_llmd.kv_layout import KVLayoutFingerprint

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig


def kv_layout_fingerprint(
    vllm_config: VllmConfig, kv_cache_config: KVCacheConfig
) -> KVLayoutFingerprint:
    """Model, dtype and KV geometry of this engine, as one comparable value."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(
            f"LLMDConnector supports models with one KV cache group (full attention); this "
            f"model has {len(groups)}"
        )
    spec = groups[0].kv_cache_spec
    served = vllm_config.model_config.served_model_name
    model = served[0] if isinstance(served, (list, tuple)) else served
    layout = kv_cache_config.kv_cache_layout or vllm_config.cache_config.kv_cache_layout
    return KVLayoutFingerprint(
        model=str(model or vllm_config.model_config.model),
        dtype=str(spec.dtype).removeprefix("torch."),
        num_layers=len(groups[0].layer_names),
        num_kv_heads=int(spec.num_kv_heads),
        head_size=int(spec.head_size),
        block_size=int(spec.block_size),
        layout=str(layout),
        tensor_parallel_size=vllm_config.parallel_config.tensor_parallel_size,
        page_bytes=int(spec.page_size_bytes),
        total_num_kv_heads=int(vllm_config.model_config.get_total_num_kv_heads()),
    )
