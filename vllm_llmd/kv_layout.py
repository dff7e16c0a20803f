"""The engine's KV layout as one comparable value: `KVLayoutFingerprint`.

Everything that moves or keeps KV bytes outside vLLM's device cache checks it first: the P/D
side channel (`transfer/`: both sides must agree before a byte moves), the offload tiers (one
disk folder per fingerprint, written into every disk file), and the shared tier. It lives
below all of them; `vllm_llmd.connector.fingerprint` computes it from vLLM's config.

Two instances of different tensor-parallel sizes may still exchange KV, head slice by head
slice (`tp_differences`, `vllm_llmd/transfer/tp_mapping.py`): then only the fields that follow
from the TP size (its own, each worker's head count and page bytes) may differ.

Pure msgspec: no vLLM, no torch.
"""

from __future__ import annotations

import msgspec


class KVLayoutFingerprint(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
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
    # KV heads of the model (num_kv_heads is this worker's share); 0: a peer that did not say
    total_num_kv_heads: int = 0

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

    def for_storage(self) -> KVLayoutFingerprint:
        """The fingerprint the tiers key and write (the disk tier's folder and file headers):
        without `total_num_kv_heads`, which only P/D between TP sizes reads, so its JSON is
        byte for byte what it was before the field existed and existing disk tiers still
        match (omit_defaults leaves the 0 out)."""
        return msgspec.structs.replace(self, total_num_kv_heads=0)

    def tp_differences(self, other: KVLayoutFingerprint) -> list[str]:
        """`differences` for two instances of possibly different TP sizes: what must still
        agree is the model's whole KV (total heads, bytes of one head of one block) and
        everything else; the per-worker share may differ."""
        if self.tensor_parallel_size == other.tensor_parallel_size:
            # an older peer does not state the total: equal TP sizes do not need it
            unstated = not (self.total_num_kv_heads and other.total_num_kv_heads)
            return [
                line
                for line in self.differences(other)
                if not (unstated and line.startswith("total_num_kv_heads:"))
            ]
        problems = [self.split_problem(), other.split_problem()]
        problems = [problem for problem in problems if problem]
        per_rank = {"tensor_parallel_size", "num_kv_heads", "page_bytes"}
        problems += [line for line in self.differences(other) if line.split(":")[0] not in per_rank]
        if not (self.total_num_kv_heads and other.total_num_kv_heads):
            problems.append("total_num_kv_heads: not stated by both (a peer without it)")
        if not problems and self.head_page_bytes != other.head_page_bytes:
            problems.append(
                f"bytes of one head of one block: {self.head_page_bytes} != {other.head_page_bytes}"
            )
        if not problems and self.layout not in HEAD_SLICED_LAYOUTS:
            problems.append(
                f"layout: {self.layout!r} keeps a head's bytes of a block apart; unequal TP "
                f"sizes need one of {', '.join(HEAD_SLICED_LAYOUTS)}"
            )
        return problems

    @property
    def head_page_bytes(self) -> int:
        """Bytes of one KV head of one block of one layer."""
        return self.page_bytes // max(1, self.num_kv_heads)

    def split_problem(self) -> str:
        """Why this worker's share cannot be vLLM's split of total_num_kv_heads over its TP
        size ("" if it can): each rank holds total/TP heads, or one replicated head."""
        total, tp, heads = self.total_num_kv_heads, self.tensor_parallel_size, self.num_kv_heads
        if total <= 0 or tp <= 0:
            return ""  # not stated: tp_differences names it
        if total % tp and tp % total:
            return f"{total} KV heads do not split over tensor-parallel size {tp}"
        if heads != max(1, total // tp) or self.page_bytes % heads:
            return f"{heads} KV heads per worker of {self.page_bytes} bytes is not TP {tp}'s share"
        return ""


# Layouts whose block of a layer holds each head's bytes together ([..., H, N, C] or
# [..., N, H, C] after the block dim): a head slice of a block is a strided view of it.
HEAD_SLICED_LAYOUTS = ("LBHNC", "LBNHC", "BLHNC", "BLNHC")
