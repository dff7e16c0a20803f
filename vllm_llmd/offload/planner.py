"""Scheduler side of the offload tiers: vLLM's hooks turned into OffloadManager calls and jobs.

The offload tier of the scheduler half's tier loop (`vllm_llmd/connector/tier.py`); its part
of each request lives in `RequestState` (`offload_*` fields).

- `hit` (from get_num_new_matched_tokens): how many tokens past the local device hit the tiers
  hold. A run held only on disk is first promoted to host memory; until it is, the answer is
  None ("ask again next step"), and a file that fails validation on the way becomes a miss.
- `plan_load` (from update_state_after_alloc): pins the hit blocks for a host → device load;
  `complete_load` (finished_recving, done or failed) unpins them.
- `plan_stores` (from build_connector_meta): newly computed full blocks of every scheduled
  request (prompt blocks by default) go to the host tier.
- `on_results`: completions the workers reported; a block completes once every worker (TP
  rank) reported it, and fails if any did.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from vllm_llmd.job_tally import JobKind, JobTally
from vllm_llmd.offload.block_info import block_info
from vllm_llmd.offload.jobs import (
    OffloadLoadSpec,
    OffloadStepSpec,
    PromoteJob,
    SpillJob,
    StoreJob,
)
from vllm_llmd.offload.manager import OffloadManager, OffloadTier, TierEvent

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput

    from vllm_llmd.connector.metadata import LLMDConnectorMetadata
    from vllm_llmd.connector.request_state import RequestState


class OffloadPlanner:
    """The offload tiers' `TierPlanner`: per-request offload bookkeeping of the scheduler half."""

    def __init__(
        self,
        manager: OffloadManager,
        block_size: int,
        num_workers: int,
        store_decode: bool,
        describe_blocks: bool = True,
    ) -> None:
        self.manager = manager
        # keep each block's tokens and parent (BlockInfo): needed by KV events and disk files
        self.describe_blocks = describe_blocks
        self.block_size = block_size
        self.num_workers = num_workers
        self.store_decode = store_decode
        # store/spill/promote reports summed over workers, until every worker reported
        self._reports = JobTally()
        # this step's jobs
        self._stores: list[StoreJob] = []
        self._loads: list[OffloadLoadSpec] = []

    # ---- loads ---------------------------------------------------------------------------

    def hit(self, state: RequestState, num_local_tokens: int) -> int | None:
        start = num_local_tokens // self.block_size
        keys = list(state.request.block_hashes[start:])
        in_host, anywhere = self.manager.lookup(keys)
        if anywhere > in_host:
            if self.manager.is_promoting(keys[in_host]):
                return None
            if self.manager.prepare_promote(keys[in_host:anywhere]) > 0:
                return None
        return (start + in_host) * self.block_size

    def plan_load(self, state: RequestState, first_token: int, block_ids: list[int]) -> None:
        first = first_token // self.block_size
        keys = list(state.request.block_hashes[first : first + len(block_ids)])
        slots = self.manager.prepare_load(keys)
        state.offload_loading_keys = keys
        self._loads.append(OffloadLoadSpec(state.request_id, tuple(block_ids), tuple(slots)))

    def release(self, state: RequestState) -> None:
        return None  # a hit pins nothing until plan_load

    def complete_load(self, state: RequestState, ok: bool) -> None:
        keys, state.offload_loading_keys = state.offload_loading_keys, []
        self.manager.complete_load(keys)

    def finish(self, state: RequestState) -> None:
        return None  # a load in flight unpins at complete_load; stores are per block

    # ---- stores --------------------------------------------------------------------------

    def plan_stores(
        self, scheduled: Sequence[tuple[RequestState, int]], scheduler_output: SchedulerOutput
    ) -> None:
        block_state = scheduler_output.kv_connector_block_state
        if block_state is None:
            return
        for state, num_scheduled in scheduled:
            request = state.request
            computed = request.num_computed_tokens + num_scheduled
            if not self.store_decode:
                computed = min(computed, request.num_prompt_tokens)
            num_full = min(computed // self.block_size, len(request.block_hashes))
            offered = state.offload_offered_blocks
            if num_full <= offered:
                continue
            (block_ids, *_) = block_state.get_block_ids(state.request_id) or ([],)
            keys = list(request.block_hashes[offered:num_full])
            block_of = dict(zip(keys, block_ids[offered:num_full], strict=False))
            infos = None
            if self.describe_blocks:
                infos = [block_info(request, i, self.block_size) for i in range(offered, num_full)]
            for key, slot in self.manager.prepare_store(keys, infos):
                self._stores.append(StoreJob(key, block_of[key], slot))
            state.offload_offered_blocks = num_full

    # ---- every step ----------------------------------------------------------------------

    def take_step(self, metadata: LLMDConnectorMetadata) -> None:
        """This step's loads and tier work for the workers."""
        plan = self.manager.take_plan()
        metadata.offload_step = OffloadStepSpec(
            spills=tuple(SpillJob(key, slot, info) for key, slot, info in plan.spills),
            promotes=tuple(PromoteJob(key, slot) for key, slot in plan.promotes),
            stores=tuple(self._stores),
            deletes=tuple(plan.deletes),
        )
        metadata.offload_loads, self._loads, self._stores = self._loads, [], []

    def on_results(self, results: JobTally) -> None:
        complete = {
            JobKind.STORE: self.manager.complete_store,
            JobKind.SPILL: self.manager.complete_spill,
            JobKind.PROMOTE: self.manager.complete_promote,
        }
        for kind in complete:
            self._reports.merge(results.of(kind))
        for kind, key, ok in self._reports.take_settled(self.num_workers):
            complete[kind]([key], ok)

    def take_events(self) -> list[TierEvent]:
        return self.manager.take_events()

    def reset(self) -> None:
        """Drop every block no copy is using (vLLM's prefix-cache reset)."""
        self.manager.reset()

    def tier_state(self) -> dict[str, list[str]]:
        """Hex keys held per tier (for the debug state file)."""
        return {
            OffloadTier.HOST.value: sorted(k.hex() for k in self.manager.host_keys()),
            OffloadTier.DISK.value: sorted(k.hex() for k in self.manager.disk_keys()),
        }
