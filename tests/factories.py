"""Objects many test modules build: one definition each, with defaults and overrides.

`make_fingerprint()` is the small float32 layout the scheduler-, worker- and tier-level unit
tests share (2 layers, 2 KV heads of 16, 32-token blocks, one worker)."""

from __future__ import annotations

from typing import Any

from vllm_llmd.transfer.messages import KVLayoutFingerprint

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
