"""Which prefill workers a decode worker reads which KV heads from, for any two TP sizes.

vLLM splits a model's K KV heads over TP size T so that rank r holds the global heads
`[r*K//T, r*K//T + max(1, K//T))`: a contiguous share when K >= T, one replicated head when
K < T (T/K ranks hold each). A decode worker of rank r (TP size D) needs its share; it reads
each of its heads from a prefill worker (TP size P) holding it, preferring rank r*P//D (vLLM's
NixlConnector choice, `tp_mapping.py`), then the next ranks in order, so that replicated heads
spread over the replicas:

    D >= P: one prefill rank, a sub-slice of its heads (or all of them, replicated)
    D <  P: the P/D ranks r spans, their heads concatenated into r's

A prefill worker frees a transfer's blocks once every decode worker that reads it released
it (`HeadRead.num_consumers`); the prefill workers nobody reads (replicas) are released
without a read by decode rank `p % D`.

Pure: no torch, no vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeadRead:
    """One decode worker's read from one prefill worker."""

    prefill_rank: int
    # [start, end) of the prefill worker's own heads read, and where they go among ours
    src: tuple[int, int]
    dst: tuple[int, int]
    # decode workers reading this prefill worker (each releases it once)
    num_consumers: int
    # src covers all the prefill worker's heads (a plain block read), dst all of ours
    whole_source: bool
    whole_destination: bool


def rank_heads(rank: int, tp_size: int, total_heads: int) -> range:
    """Global KV heads rank holds in an instance of tp_size (vLLM's split)."""
    if total_heads % tp_size and tp_size % total_heads:
        raise ValueError(f"{total_heads} KV heads do not split over tensor-parallel size {tp_size}")
    if not 0 <= rank < tp_size:
        raise ValueError(f"rank {rank} is outside tensor-parallel size {tp_size}")
    start = rank * total_heads // tp_size
    return range(start, start + max(1, total_heads // tp_size))


def _source_rank(head: int, decode_rank: int, prefill_tp: int, decode_tp: int, total: int) -> int:
    """The prefill rank a decode rank reads a global head from."""
    preferred = decode_rank * prefill_tp // decode_tp
    holders = [p for p in range(prefill_tp) if head in rank_heads(p, prefill_tp, total)]
    later = [p for p in holders if p >= preferred]
    return later[0] if later else holders[0]


def head_reads(
    decode_rank: int, prefill_tp: int, decode_tp: int, total_heads: int
) -> list[HeadRead]:
    """The reads of decode_rank, in order of its heads; ValueError if the sizes do not split."""
    ours = rank_heads(decode_rank, decode_tp, total_heads)
    runs: list[tuple[int, int, int]] = []  # (prefill rank, first global head, last + 1)
    for head in ours:
        source = _source_rank(head, decode_rank, prefill_tp, decode_tp, total_heads)
        if runs and runs[-1][0] == source and runs[-1][2] == head:
            runs[-1] = (source, runs[-1][1], head + 1)
        else:
            runs.append((source, head, head + 1))
    reads = []
    for source, first, end in runs:
        theirs = rank_heads(source, prefill_tp, total_heads)
        src = (first - theirs.start, end - theirs.start)
        dst = (first - ours.start, end - ours.start)
        reads.append(
            HeadRead(
                prefill_rank=source,
                src=src,
                dst=dst,
                num_consumers=len(consumers(source, prefill_tp, decode_tp, total_heads)),
                whole_source=src == (0, len(theirs)),
                whole_destination=dst == (0, len(ours)),
            )
        )
    return reads


def consumers(prefill_rank: int, prefill_tp: int, decode_tp: int, total_heads: int) -> list[int]:
    """Decode ranks that read prefill_rank."""
    return [
        rank
        for rank in range(decode_tp)
        if any(
            _source_rank(head, rank, prefill_tp, decode_tp, total_heads) == prefill_rank
            for head in rank_heads(rank, decode_tp, total_heads)
        )
    ]


def unread_ranks_released_by(
    decode_rank: int, prefill_tp: int, decode_tp: int, total_heads: int
) -> list[int]:
    """Prefill ranks no decode rank reads (replicas) that decode_rank releases unread."""
    return [
        p
        for p in range(decode_rank, prefill_tp, decode_tp)
        if not consumers(p, prefill_tp, decode_tp, total_heads)
    ]
