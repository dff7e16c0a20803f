"""Helpers the disk-tier tests share: a small fingerprint, a store, keys and block bytes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import factories
import torch

from vllm_llmd.kv_layout import KVLayoutFingerprint
from vllm_llmd.offload.disk_store import DiskBlockStore

NUM_LAYERS, PAGE_BYTES = 4, 250  # odd sizes on purpose: 1000-byte chunks


def make_fingerprint(**overrides: object) -> KVLayoutFingerprint:
    fields: dict[str, object] = dict(
        model="tiny-llama",
        dtype="bfloat16",
        num_layers=NUM_LAYERS,
        block_size=16,
        layout="NHD",
        tensor_parallel_size=2,
        page_bytes=PAGE_BYTES,
    )
    return factories.make_fingerprint(**(fields | overrides))


def make_store(root: Path, tp_rank: int = 0, **overrides: object) -> DiskBlockStore:
    fingerprint = make_fingerprint(**overrides)
    block_bytes = fingerprint.num_layers * fingerprint.page_bytes
    return DiskBlockStore(root, fingerprint, tp_rank, block_bytes)


def make_key(i: int) -> bytes:
    return hashlib.sha256(f"block {i}".encode()).digest()


def make_block(block_bytes: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (block_bytes,), dtype=torch.uint8, generator=generator)


def set_mtime(path: Path, mtime: float) -> None:
    os.utime(path, (mtime, mtime))
