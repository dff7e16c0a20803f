"""Where the disk tier keeps its files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgspec

from vllm_llmd.kv_layout import KVLayoutFingerprint


def disk_tier_folder(root: str | Path, fingerprint: KVLayoutFingerprint) -> Path:
    """The disk tier's folder for one model and layout under root: one per fingerprint, so
    instances of different models can share a root without deleting each other's blocks. Keyed
    on `for_storage()`: the folder of an earlier version (without total_num_kv_heads) is kept."""
    digest = hashlib.sha256(msgspec.json.encode(fingerprint.for_storage())).hexdigest()[:16]
    return Path(root) / f"kv-{digest}"
