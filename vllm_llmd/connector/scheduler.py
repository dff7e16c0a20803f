"""Scheduler half of LLMDConnector: runs in the engine-core process, owns "what is where".

Hooks vLLM calls on this half, in order, for each request:
`get_num_new_matched_tokens` → `update_state_after_alloc` → `build_connector_meta` (every step)
→ `request_finished` (once, before the request's blocks are freed). A preempted request comes
back through `get_num_new_matched_tokens`; `request_finished` is still called once.

It owns one `RequestState` per live request (`request_state.py`) and asks its tiers
(`tier.py`), in order, what each adds past the device prefix cache: the offload tiers
(`host_offload_bytes` > 0: host, then disk, `vllm_llmd/offload/planner.py`), the shared tier
(`shared_tier_url`: whole LMCache chunks from token 0, its lookup async,
`vllm_llmd/shared_tier/planner.py`), then on a decode instance (`kv_consumer`/`kv_both`) the remote
prefill named by the request's kv_transfer_params (`remote_prefill.py`). Their parts form one
async load. Every ending of a request goes through `_finish`, where each tier frees its part.

P/D, prefill side (`kv_producer`/`kv_both`): a request sent with
`kv_transfer_params={"do_remote_decode": true}` finishes normally; `request_finished` then keeps
its blocks (`delay_free`) and answers with `RemotePrefillParams`. The worker half holds them
until the decode instance releases them, or the lease expires.
"""

from __future__ import annotations

import math
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from vllm.v1.request import RequestStatus

from vllm_llmd.connector.config import LLMDConnectorConfig
from vllm_llmd.connector.metadata import (
    LLMDConnectorMetadata,
    LLMDHandshake,
    LLMDWorkerMetadata,
    SendSpec,
)
from vllm_llmd.connector.remote_prefill import RemotePrefillPlanner
from vllm_llmd.connector.request_state import LoadPhase, RequestState
from vllm_llmd.connector.stats import LLMDConnectorStats
from vllm_llmd.connector.tier_events import all_cleared, shared_tier_events, to_kv_events
from vllm_llmd.job_tally import JobTally
from vllm_llmd.kv_layout import KVLayoutFingerprint
from vllm_llmd.log import get_logger
from vllm_llmd.transfer.params import (
    RemotePrefillParams,
    is_llmd_remote_prefill,
    prompt_digest,
    wants_remote_decode,
)

if TYPE_CHECKING:
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

    from vllm_llmd.connector.tier import TierPlanner
    from vllm_llmd.offload.planner import OffloadPlanner
    from vllm_llmd.shared_tier.planner import SharedTierPlanner

logger = get_logger(__name__)

# A prefill hands off KV only for requests that ended normally; aborts free at once.
_HANDOFF_STATUSES = (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED)


class LLMDConnectorScheduler:
    """Plans each step's loads, stores, sends and releases. It holds no tensors."""

    def __init__(
        self,
        config: LLMDConnectorConfig,
        engine_id: str,
        fingerprint: KVLayoutFingerprint,
        is_producer: bool,
        is_consumer: bool,
        offload: OffloadPlanner | None = None,
        publish_events: bool = False,
        shared: SharedTierPlanner | None = None,
    ) -> None:
        self.config = config
        self.offload = offload
        self.shared = shared
        self.remote = RemotePrefillPlanner(config, fingerprint) if is_consumer else None
        # lookup order: each tier adds what the ones before it (and the device cache) lack
        self.tiers: list[TierPlanner] = [
            tier for tier in (offload, shared, self.remote) if tier is not None
        ]
        # vLLM's KV-event publisher is on: announce our tiers' changes on it
        self.publish_events = publish_events
        self._events: list[KVCacheEvent] = []
        self._state_version = -1
        self._reported_gauges: dict[str, int] = {}  # the tier gauges last reported in stats
        self.engine_id = engine_id
        self.fingerprint = fingerprint
        self.block_size = fingerprint.block_size
        self.is_producer = is_producer
        self.is_consumer = is_consumer
        # side-channel port per TP rank, learned from the workers' handshake at start-up
        self.side_channel_ports: tuple[int, ...] | None = None
        # this step's hand-offs for the worker half; drained by build_connector_meta
        self._sends: list[SendSpec] = []
        # request id -> its state, from its first get_num_new_matched_tokens to its finish
        self._states: dict[str, RequestState] = {}

    # ---- start-up ------------------------------------------------------------------------

    def set_worker_handshakes(self, handshakes: dict[int, LLMDHandshake]) -> None:
        ranks = sorted(handshakes)
        if ranks != list(range(self.fingerprint.tensor_parallel_size)):
            raise RuntimeError(f"LLMDConnector: handshakes from TP ranks {ranks}, expected all")
        ports = tuple(handshakes[r].side_channel_port for r in ranks)
        if all(port is not None for port in ports):
            self.side_channel_ports = ports  # type: ignore[assignment]
            logger.info(
                "LLMDConnector: P/D side channel on %s ports %s",
                self.config.side_channel_host,
                list(ports),
            )

    def state_of(self, request_id: str) -> RequestState | None:
        """The connector's state of a request; None once it holds nothing for it."""
        return self._states.get(request_id)

    # ---- loads ---------------------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        state = self._states.get(request.request_id)
        if state is None:
            state = self._states[request.request_id] = RequestState(request)
        end, ends = num_computed_tokens, []
        for tier in self.tiers:
            tier_end = tier.hit(state, end)
            if tier_end is None:  # a disk promotion or a lookup on its way
                state.phase = LoadPhase.ASKED
                return None, False
            end = max(end, tier_end)
            ends.append(end)
        state.phase = LoadPhase.MATCHED
        state.num_computed_tokens, state.tier_ends = num_computed_tokens, tuple(ends)
        num_external = end - num_computed_tokens
        return num_external, num_external > 0

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        state = self._states.get(request.request_id)
        if state is None or state.phase != LoadPhase.MATCHED:
            return
        if num_external_tokens == 0:  # vLLM chose not to load (e.g. capped the hit)
            for tier in self.tiers:
                tier.release(state)
            state.phase = LoadPhase.COMPUTING
            return
        block_ids = blocks.get_block_ids()[0]
        start = state.num_computed_tokens
        for tier, end in zip(self.tiers, state.tier_ends, strict=True):
            if end > start:
                ids = block_ids[start // self.block_size : math.ceil(end / self.block_size)]
                tier.plan_load(state, start, ids)
                start = end
            else:
                tier.release(state)
        state.load_in_flight = start > state.num_computed_tokens
        state.phase = LoadPhase.LOADING if state.load_in_flight else LoadPhase.COMPUTING

    # ---- every step ----------------------------------------------------------------------

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> LLMDConnectorMetadata:
        idle = scheduler_output is not None and not any(
            scheduler_output.num_scheduled_tokens.values()
        )
        metadata = LLMDConnectorMetadata(sends=self._sends, idle_step=idle)
        self._sends = []
        scheduled = self._scheduled(scheduler_output)
        for tier in self.tiers:
            tier.plan_stores(scheduled, scheduler_output)
            tier.take_step(metadata)
        if self.offload is not None:
            self._collect_tier_changes()
        return metadata

    def _scheduled(
        self, scheduler_output: SchedulerOutput | None
    ) -> list[tuple[RequestState, int]]:
        """(state, tokens scheduled this step) of each live request vLLM scheduled."""
        if scheduler_output is None:
            return []
        scheduled = []
        for request_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
            state = self._states.get(request_id)
            if state is not None and not state.is_finished:
                scheduled.append((state, num_tokens))
        return scheduled

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        worker_meta = connector_output.kv_connector_worker_meta
        results = JobTally()
        if isinstance(worker_meta, LLMDWorkerMetadata):
            results = worker_meta.results
        for tier in self.tiers:
            tier.on_results(results)
        failed = set(getattr(connector_output, "failed_recving", None) or ())
        for request_id in connector_output.finished_recving or ():
            state = self._states.get(request_id)
            if state is not None and state.load_in_flight:
                self._complete_load(state, ok=request_id not in failed)
        if self.offload is not None:
            self._collect_tier_changes()

    def _complete_load(self, state: RequestState, ok: bool) -> None:
        """The request's load ended (a failed one is recomputed or fails per vLLM's policy)."""
        for tier in self.tiers:
            tier.complete_load(state, ok)
        state.load_in_flight = False
        if state.is_finished:  # it finished while loading: nothing else is left
            del self._states[state.request_id]
        else:
            state.phase = LoadPhase.COMPUTING

    def _collect_tier_changes(self) -> None:
        assert self.offload is not None
        changes = self.offload.take_events()
        if self.publish_events and changes:
            self._events.extend(to_kv_events(changes, self.block_size))
        if self.config.debug_state_path and self.offload.manager.version != self._state_version:
            self._state_version = self.offload.manager.version
            write_json_atomic(self.config.debug_state_path, self.offload.tier_state())

    def take_stats(self) -> LLMDConnectorStats | None:
        """The offload tiers' gauges (occupancy, and chunks the copies in flight hold), when
        they changed since the last report."""
        if self.offload is None:
            return None
        manager = self.offload.manager
        gauges = {
            "offload_host_chunks": manager.num_in_host(),
            "offload_host_capacity_chunks": manager.num_host_slots,
            "offload_disk_chunks": manager.num_on_disk(),
            "offload_disk_capacity_chunks": manager.num_disk_blocks,
            "offload_busy_chunks": manager.num_pins() + manager.num_staging_in_use(),
        }
        if gauges == self._reported_gauges:
            return None
        self._reported_gauges = gauges
        stats = LLMDConnectorStats()
        for key, value in gauges.items():
            stats.set(key, value)
        return stats

    def take_events(self) -> list[KVCacheEvent]:
        if self.shared is not None:
            changes = self.shared.take_changes()
            if self.publish_events and changes:
                self._events.extend(shared_tier_events(changes, self.block_size))
        events, self._events = self._events, []
        return events

    def reset_cache(self) -> bool:
        """vLLM reset its prefix cache: drop the tiers too, and say so on the event stream."""
        if self.offload is not None:
            self.offload.reset()
            self._collect_tier_changes()
            if self.publish_events:
                self._events.append(all_cleared())
        return True

    # ---- every ending --------------------------------------------------------------------

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        # decode side, finished before it ever loaded: never a hand-off
        was_remote_prefill = is_llmd_remote_prefill(request.kv_transfer_params)
        self._finish(request)
        params = request.kv_transfer_params
        if was_remote_prefill:
            return False, None
        if not (self.is_producer and wants_remote_decode(params)):
            return False, None
        prompt = list(request.prompt_token_ids or ())
        num_tokens = min(len(prompt), request.num_computed_tokens)
        num_blocks = math.ceil(num_tokens / self.block_size)
        if request.status not in _HANDOFF_STATUSES or num_tokens == 0:
            return False, None
        if self.side_channel_ports is None:
            logger.error("LLMDConnector: no side channel (no kv_producer worker); cannot hand off")
            return False, None
        transfer_id = secrets.token_urlsafe(24)
        self._sends.append(SendSpec(request.request_id, transfer_id, tuple(block_ids[:num_blocks])))
        answer = RemotePrefillParams(
            engine_id=self.engine_id,
            request_id=request.request_id,
            host=self.config.side_channel_host,
            ports=self.side_channel_ports,
            block_ids=tuple(block_ids[:num_blocks]),
            num_tokens=num_tokens,
            transfer_id=transfer_id,
            fingerprint=self.fingerprint,
            prompt_digest=prompt_digest(prompt),
        )
        return True, answer.to_dict()

    def _finish(self, request: Request) -> None:
        """The one path every ending takes: each tier frees the request's part, and its state
        goes (once a load in flight ended: its copies still read pinned blocks)."""
        state = self._states.get(request.request_id) or RequestState(request)
        normal = request.status in _HANDOFF_STATUSES
        state.phase = LoadPhase.FINISHED if normal else LoadPhase.ABORTED
        for tier in self.tiers:
            tier.finish(state)
        if not state.load_in_flight:
            self._states.pop(request.request_id, None)


def write_json_atomic(path: str, obj: object) -> None:
    """Replace path's content with obj as JSON; readers never see a partial file."""
    target = Path(path)
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    temp.write_bytes(msgspec.json.encode(obj))
    os.replace(temp, target)
