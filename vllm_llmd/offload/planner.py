"""Scheduler side of the offload tiers: vLLM's hooks turned into OffloadManager calls and jobs.

The offload tier of the scheduler half's tier loop (`vllm_llmd/connector/tier.py`); its part
of each request lives in `RequestState` (`offload_*` fields).

- `hit` (from get_num_new_matched_tokens): how many tokens past the local device hit the tiers
  hold, in host memory or on disk. Disk files found at start-up are read back whole first;
  until they are, the answer is None ("ask again next step"), and one that fails becomes a
  miss.
- `plan_load` (from update_state_after_alloc): pins the hit blocks for a load into the device
  cache, each from its host slot or its disk file; `complete_load` (finished_recving, done or
  failed) unpins them.
- `plan_stores` (from build_connector_meta): newly computed full blocks of every scheduled
  request (prompt blocks by default) go to the host tier, or straight to disk when every host
  slot is pinned. Blocks that found no slot at all are offered again next step; those still
  not stored when the request ends are counted as dropped (`offload_dropped_chunks`) and
  logged.
- `on_results`: completions the workers reported; a block completes once every worker (TP
  rank) reported it, and fails if any did.
- `take_step` also applies the header checks of the disk files found at start-up as they come
  in (`disk_check`): announced when valid, out of the index when not.

Stores run behind the steps, off their critical path: a request's device blocks stay its own
until it ends, so its stores need not be done before the next forward. Only when a request
whose stores are still in flight ends or is preempted (vLLM may then give its blocks to
another request) does the next step wait for them first (`OffloadStepSpec.flush_first`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from vllm_llmd.hashing import BlockHash, hash_hex
from vllm_llmd.job_tally import JobKind, JobTally
from vllm_llmd.log import ThrottledLog, get_logger
from vllm_llmd.offload.block_info import block_info
from vllm_llmd.offload.disk_check import StartupHeaderCheck
from vllm_llmd.offload.jobs import (
    DiskStoreJob,
    OffloadLoadSpec,
    OffloadStepSpec,
    SpillJob,
    StoreJob,
)
from vllm_llmd.offload.manager import OffloadManager
from vllm_llmd.offload.records import OffloadTier, TierEvent

logger = get_logger(__name__)

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

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
        header_check: StartupHeaderCheck | None = None,
    ) -> None:
        self.manager = manager
        # the header check of the disk files found at start-up, until it is done
        self._header_check = header_check
        # keep each block's tokens and parent (BlockInfo): needed by KV events and disk files
        self.describe_blocks = describe_blocks
        self.block_size = block_size
        self.num_workers = num_workers
        self.store_decode = store_decode
        # store/spill/promote reports summed over workers, until every worker reported
        self._reports = JobTally()
        # this step's jobs
        self._stores: list[StoreJob] = []
        self._disk_stores: list[DiskStoreJob] = []
        self._loads: list[OffloadLoadSpec] = []
        # computed blocks of finished requests that never found a slot, since the last step
        self._num_dropped = 0
        self._dropped_log = ThrottledLog(logger)
        # request id -> its planned stores no worker has reported yet (host or straight to disk)
        self._storing: dict[str, set[BlockHash]] = {}
        self._owner_of: dict[BlockHash, str] = {}
        # a request with stores in flight ended or was preempted since the last step
        self._flush_needed = False

    # ---- loads ---------------------------------------------------------------------------

    def hit(self, state: RequestState, num_local_tokens: int) -> int | None:
        start = num_local_tokens // self.block_size
        keys = list(state.request.block_hashes[start:])
        _, anywhere = self.manager.lookup(keys)
        if self.manager.prepare_verify(self.manager.unverified(keys[:anywhere])):
            return None  # files found at start-up are read back first
        return (start + anywhere) * self.block_size

    def plan_load(self, state: RequestState, first_token: int, block_ids: list[int]) -> None:
        first = first_token // self.block_size
        keys = list(state.request.block_hashes[first : first + len(block_ids)])
        planned = self.manager.prepare_load(keys)
        state.offload_loading_keys = keys
        host = [(block, p.host_slot) for block, p in zip(block_ids, planned, strict=True)]
        self._loads.append(
            OffloadLoadSpec(
                state.request_id,
                block_ids=tuple(block for block, slot in host if slot is not None),
                slots=tuple(slot for _, slot in host if slot is not None),
                disk_block_ids=tuple(block for block, slot in host if slot is None),
                disk_keys=tuple(p.key for p in planned if p.host_slot is None),
            )
        )

    def release(self, state: RequestState) -> None:
        return None  # a hit pins nothing until plan_load

    def complete_load(self, state: RequestState, ok: bool) -> None:
        keys, state.offload_loading_keys = state.offload_loading_keys, []
        self.manager.complete_load(keys)

    def finish(self, state: RequestState) -> None:
        # its device blocks may go to another request next step: its stores finish first
        self._blocks_leave(state.request_id)
        # a load in flight unpins at complete_load; stores are per block, but blocks never
        # offered (no slot was free) are lost with the request's device blocks
        dropped = self._num_full_blocks(state.request) - state.offload_offered_blocks
        if dropped > 0:
            self._num_dropped += dropped
            self._dropped_log.warning(
                "LLMDConnector offload: %d computed blocks of request %s reached no tier (every "
                "host and staging slot was in use); raise host_offload_bytes or "
                "offload_staging_bytes",
                dropped,
                state.request_id,
            )

    # ---- stores --------------------------------------------------------------------------

    def plan_stores(
        self, scheduled: Sequence[tuple[RequestState, int]], scheduler_output: SchedulerOutput
    ) -> None:
        if not hasattr(scheduler_output, "preempted_req_ids"):
            # a vLLM that does not say whom it preempted: wait for stores every step, as
            # before, rather than let a freed block be overwritten under a store
            self._flush_needed = self._flush_needed or bool(self._storing)
        for request_id in getattr(scheduler_output, "preempted_req_ids", None) or ():
            self._blocks_leave(request_id)  # freed in this very schedule
        block_state = scheduler_output.kv_connector_block_state
        if block_state is None:
            return
        for state, num_scheduled in scheduled:
            request = state.request
            num_full = self._num_full_blocks(request, num_scheduled)
            offered = state.offload_offered_blocks
            if num_full <= offered:
                continue
            (block_ids, *_) = block_state.get_block_ids(state.request_id) or ([],)
            keys = list(request.block_hashes[offered:num_full])
            block_of = dict(zip(keys, block_ids[offered:num_full], strict=False))
            infos = None
            if self.describe_blocks:
                infos = [block_info(request, i, self.block_size) for i in range(offered, num_full)]
            planned, num_taken = self.manager.prepare_store(keys, infos)
            info_of = dict(zip(keys, infos, strict=True)) if infos is not None else {}
            for store in planned:
                self._storing.setdefault(state.request_id, set()).add(store.key)
                self._owner_of[store.key] = state.request_id
                if store.to_disk:
                    info = info_of.get(store.key, "")
                    self._disk_stores.append(
                        DiskStoreJob(store.key, block_of[store.key], store.slot, info)
                    )
                else:
                    self._stores.append(StoreJob(store.key, block_of[store.key], store.slot))
            state.offload_offered_blocks = offered + num_taken

    def _blocks_leave(self, request_id: str) -> None:
        """The request's device blocks are freed: any store of them still in flight must end
        before the next forward may overwrite them."""
        keys = self._storing.pop(request_id, None)
        if keys:
            self._flush_needed = True
            for key in keys:
                self._owner_of.pop(key, None)

    def stores_in_flight(self, request_id: str) -> int:
        """The request's planned stores no worker has reported yet."""
        return len(self._storing.get(request_id, ()))

    def _stored(self, key: BlockHash) -> None:
        request_id = self._owner_of.pop(key, None)
        if request_id is not None:
            keys = self._storing[request_id]
            keys.discard(key)
            if not keys:
                del self._storing[request_id]

    def _num_full_blocks(self, request: Request, num_scheduled: int = 0) -> int:
        """The request's full blocks once this step's tokens are computed (those to store)."""
        computed = request.num_computed_tokens + num_scheduled
        if not self.store_decode:
            computed = min(computed, request.num_prompt_tokens)
        return min(computed // self.block_size, len(request.block_hashes))

    # ---- every step ----------------------------------------------------------------------

    def take_step(self, metadata: LLMDConnectorMetadata) -> None:
        """This step's loads and tier work for the workers."""
        if self._header_check is not None:
            done = self._header_check.done  # before take(): nothing is left behind
            self.manager.describe_disk_blocks(self._header_check.take())
            if done:
                self._header_check = None
        plan = self.manager.take_plan()
        metadata.offload_step = OffloadStepSpec(
            spills=tuple(SpillJob(key, slot, info) for key, slot, info in plan.spills),
            verifies=tuple(plan.verifies),
            stores=tuple(self._stores),
            disk_stores=tuple(self._disk_stores),
            deletes=tuple(plan.deletes),
            num_dropped=self._num_dropped,
            flush_first=self._flush_needed,
        )
        self._flush_needed = False
        metadata.offload_loads, self._loads = self._loads, []
        self._stores, self._disk_stores, self._num_dropped = [], [], 0

    def on_results(self, results: JobTally) -> None:
        complete = {
            JobKind.STORE: self.manager.complete_store,
            JobKind.SPILL: self.manager.complete_spill,
            JobKind.VERIFY: self.manager.complete_verify,
            JobKind.DISK_READ: self.manager.complete_disk_read,
        }
        for kind in complete:
            self._reports.merge(results.of(kind))
        for kind, key, ok in self._reports.take_settled(self.num_workers):
            complete[kind]([key], ok)
            if kind in (JobKind.STORE, JobKind.SPILL):  # a store to disk reports as a spill
                self._stored(key)

    def take_events(self) -> list[TierEvent]:
        return self.manager.take_events()

    def reset(self) -> None:
        """Drop every block no copy is using (vLLM's prefix-cache reset)."""
        self.manager.reset()

    def close(self) -> None:
        if self._header_check is not None:
            self._header_check.close()

    def tier_state(self) -> dict[str, list[str]]:
        """Hex keys held per tier (for the debug state file)."""
        return {
            OffloadTier.HOST.value: sorted(hash_hex(k) for k in self.manager.host_keys()),
            OffloadTier.DISK.value: sorted(hash_hex(k) for k in self.manager.disk_keys()),
        }
