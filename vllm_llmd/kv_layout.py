"""The engine's KV layout as one comparable value: `KVLayoutFingerprint`.

Everything that moves or keeps KV bytes outside vLLM's device cache checks it first: the P/D
side channel (`transfer/`: both sides must agree before a byte moves), the offload tiers (one
disk folder per fingerprint, written into every disk file), and the shared tier. It lives
below all of them; `vllm_llmd.connector.fingerprint` computes it from vLLM's config.

Pure msgspec: no vLLM, no torch.
"""

from __future__ import annotations

import msgspec


class KVLayoutFingerprint(msgspec.Struct, frozen=True, kw_only=True):
    """What both sides must agree on before a byte of KV moves between them."""

    model: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_size: int
    block_size: int
    layout: str
    tensor_parallel_size: int
    # bytes of one block of one layer on one worker
    page_bytes: int

    def differences(self, other: KVLayoutFingerprint) -> list[str]:
        """Human-readable `field: ours != theirs` for each field that differs (for local logs:
        the values are not for a peer, see `differing_fields`)."""
        return [
            f"{name}: {getattr(self, name)!r} != {getattr(other, name)!r}"
            for name in self.differing_fields(other)
        ]

    def differing_fields(self, other: KVLayoutFingerprint) -> list[str]:
        """Names of the fields that differ: all a side-channel peer is told, since the values
        would let anyone who can reach the port forge params that match this layout."""
        return [
            name for name in self.__struct_fields__ if getattr(self, name) != getattr(other, name)
        ]
