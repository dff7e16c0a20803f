"""One request as the connector's scheduler half sees it: `RequestState`, with its `LoadPhase`.

The scheduler half keeps one `RequestState` per live request, from the first
`get_num_new_matched_tokens` to `request_finished`, and every tier reads and writes its part
of it here (none keeps a per-request container of its own). The worker half runs in other
processes and keeps its own per-request bookkeeping.

    ASKED ──every tier answered──▶ MATCHED ──update_state_after_alloc──▶ LOADING | COMPUTING
    LOADING ──finished_recving (done or failed)──▶ COMPUTING
    COMPUTING ──preempted: asked again──▶ ASKED | MATCHED
    any ──request_finished──▶ FINISHED | ABORTED (a load in flight completes first)

A finished state holds nothing: `finish` in the scheduler half is the one path every ending
takes (normal finish, abort, preempt-then-finish, failed load, rejected params), and each tier
frees its part there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm.v1.request import Request

    from vllm_llmd.hashing import BlockHash
    from vllm_llmd.shared_tier.lookup import SharedLookup
    from vllm_llmd.transfer.params import RemotePrefillParams


class LoadPhase(IntEnum):
    """Where a request is in the connector's load protocol (not vLLM's `RequestStatus`).

    Ordered so that `phase >= LoadPhase.FINISHED` means finished."""

    ASKED = 0  # a tier has not answered yet (lookup, disk promotion): asked again next step
    MATCHED = 1  # every tier answered: waits for vLLM's block allocation
    LOADING = 2  # an async load (tiers and/or pull) is in flight: waits for finished_recving
    COMPUTING = 3  # nothing to load any more: vLLM computes the rest
    FINISHED = 4  # vLLM finished it normally
    ABORTED = 5  # aborted, errored or ignored


@dataclass(eq=False, slots=True)
class RequestState:
    """Everything the scheduler half holds for one request."""

    request: Request
    phase: LoadPhase = LoadPhase.ASKED
    # tokens vLLM's device prefix cache holds, as of the last get_num_new_matched_tokens
    num_computed_tokens: int = 0
    # absolute token each tier loads up to (from the previous one's end), in tier order
    tier_ends: tuple[int, ...] = ()
    # a load in flight ends before the state may be dropped (its copies read pinned blocks)
    load_in_flight: bool = False

    # ---- offload tier (host/disk) --------------------------------------------------------
    # leading blocks already offered for storing
    offload_offered_blocks: int = 0
    # blocks pinned for this request's host → device load
    offload_loading_keys: list[BlockHash] = field(default_factory=list)

    # ---- shared tier ---------------------------------------------------------------------
    # the lookup on the LMCache server (its answer and locks), until loaded or released
    shared_lookup: SharedLookup | None = None
    # the server has a lookup session for this request (ended at finish)
    shared_session: bool = False
    # prompt tokens the server holds or was sent (a chunk multiple)
    shared_offered: int = 0

    # ---- remote prefill (P/D pull) -------------------------------------------------------
    # the validated params this request pulls with, once decided
    remote: RemotePrefillParams | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def is_finished(self) -> bool:
        return self.phase >= LoadPhase.FINISHED

    def holds_nothing(self) -> bool:
        """No pin, lock, lookup or session is left for this request."""
        return not (
            self.load_in_flight
            or self.offload_loading_keys
            or self.shared_lookup is not None
            or self.shared_session
        )
