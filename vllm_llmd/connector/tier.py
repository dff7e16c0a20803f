"""`TierPlanner`: what the scheduler half asks of every place KV can be loaded from.

The scheduler half holds its tiers in lookup order (vLLM's device prefix cache comes first and
is vLLM's own): the offload tiers (host, then disk: `vllm_llmd/offload/planner.py`), the shared
tier (`vllm_llmd/shared_tier/planner.py`), then the remote prefill (P/D pull:
`remote_prefill.py`). Each hook of the scheduler half loops over them:

- `get_num_new_matched_tokens` → `hit`, each tier asked with what the ones before it cover;
- `update_state_after_alloc` → `plan_load` for a tier that adds tokens, `release` otherwise
  (and for every tier when vLLM loads nothing);
- `build_connector_meta` → `plan_stores`, then `take_step` adds the tier's jobs to the step;
- `update_connector_output` → `on_results` (job tallies), `complete_load` (finished_recving);
- `request_finished` → `finish`: the tier frees whatever the request still holds.

A tier keeps no per-request container: its part of a request lives in `RequestState`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput

    from vllm_llmd.connector.metadata import LLMDConnectorMetadata
    from vllm_llmd.connector.request_state import RequestState
    from vllm_llmd.job_tally import JobTally


class TierPlanner(Protocol):
    """The scheduler side of one tier. Every hook runs on the engine's scheduler thread."""

    def hit(self, state: RequestState, num_local_tokens: int) -> int | None:
        """Tokens from token 0 this tier can provide, or None: not known yet, ask again.

        num_local_tokens: what vLLM's cache and the tiers before this one cover (block
        aligned). An answer at or below it adds nothing."""
        ...

    def plan_load(self, state: RequestState, first_token: int, block_ids: list[int]) -> None:
        """Load tokens first_token..(this tier's hit) into block_ids, one per block."""
        ...

    def release(self, state: RequestState) -> None:
        """This request will not load from this tier now: free what the hit holds."""
        ...

    def complete_load(self, state: RequestState, ok: bool) -> None:
        """The request's load ended (done, or failed if not ok)."""
        ...

    def plan_stores(
        self, scheduled: Sequence[tuple[RequestState, int]], scheduler_output: SchedulerOutput
    ) -> None:
        """Plan stores of the blocks this step computes: (state, tokens scheduled) pairs."""
        ...

    def take_step(self, metadata: LLMDConnectorMetadata) -> None:
        """Add this step's planned jobs to the worker half's metadata."""
        ...

    def on_results(self, results: JobTally) -> None:
        """The workers' reports of ended jobs, summed over the workers of one step."""
        ...

    def finish(self, state: RequestState) -> None:
        """vLLM finished the request: free everything it holds here (a load in flight is
        completed by `complete_load`)."""
        ...
