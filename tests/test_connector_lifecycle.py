"""Every request lifecycle through the connector's scheduler half, without servers: real vLLM
`Request` objects (with vLLM's block hasher), a real `OffloadManager` behind the offload tier,
and the hooks in the order vLLM's scheduler calls them. The worker half's answers (finished
loads, job reports) are the typed messages it sends (`KVConnectorOutput`, `LLMDWorkerMetadata`).

Each scenario ends as vLLM's own connector tests do: the connector holds nothing for the
request (no `RequestState`, no pinned chunk, no lookup, no pull or release left to send).
Stand-ins, because no engine runs here: vLLM's `KVCacheBlocks` and `SchedulerOutput` are
reduced to the two methods the connector reads."""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Any

import pytest
from factories import BLOCK, make_request, make_scheduler, remote_prefill_params
from vllm.v1.outputs import KVConnectorOutput
from vllm.v1.request import Request, RequestStatus

from vllm_llmd.connector.metadata import LLMDConnectorMetadata, LLMDWorkerMetadata
from vllm_llmd.connector.remote_prefill import RemotePrefillPlanner
from vllm_llmd.connector.request_state import LoadPhase
from vllm_llmd.connector.scheduler import LLMDConnectorScheduler
from vllm_llmd.connector.tier import TierPlanner
from vllm_llmd.job_tally import JobKind, JobTally
from vllm_llmd.offload.block_info import block_info
from vllm_llmd.offload.jobs import OffloadLoadSpec
from vllm_llmd.offload.planner import OffloadPlanner
from vllm_llmd.shared_tier.planner import SharedTierPlanner
from vllm_llmd.transfer.params import prompt_digest

PROMPT = list(range(1000, 1000 + 3 * BLOCK + 5))  # 3 full blocks and a tail
FULL = 3 * BLOCK
DEVICE_BLOCKS = [40, 41, 42, 43]  # what vLLM allocates for PROMPT (4 blocks)
HOST_SLOTS = 8


# ---- factories -----------------------------------------------------------------------------


def blocks(block_ids: list[int]) -> SimpleNamespace:
    """vLLM's KVCacheBlocks as the connector reads it."""
    return SimpleNamespace(get_block_ids=lambda: (block_ids,))


def step(
    scheduler: LLMDConnectorScheduler,
    scheduled: dict[str, int] | None = None,
    preempted: set[str] | None = None,
) -> LLMDConnectorMetadata:
    """build_connector_meta for a step that runs `scheduled` (request id -> tokens), after
    preempting `preempted` in the same schedule."""
    block_state = SimpleNamespace(get_block_ids=lambda request_id: (DEVICE_BLOCKS,))
    output = SimpleNamespace(
        kv_connector_block_state=block_state,
        num_scheduled_tokens=scheduled or {},
        preempted_req_ids=preempted,
    )
    return scheduler.build_connector_meta(output)


def worker_reports(
    scheduler: LLMDConnectorScheduler,
    results: JobTally | None = None,
    finished_recving: set[str] | None = None,
    failed_recving: set[str] | None = None,
) -> None:
    """update_connector_output with what the worker half sent this step."""
    meta = LLMDWorkerMetadata(results) if results is not None else None
    scheduler.update_connector_output(
        KVConnectorOutput(
            finished_recving=finished_recving,
            kv_connector_worker_meta=meta,
            failed_recving=failed_recving or set(),
        )
    )


def all_done(metadata: LLMDConnectorMetadata) -> JobTally:
    """The worker's report that every store, disk write and verification of a step succeeded."""
    tally = JobTally()
    step = metadata.offload_step
    for kind, keys in (
        (JobKind.STORE, [job.key for job in step.stores]),
        (JobKind.SPILL, [job.key for job in (*step.spills, *step.disk_stores)]),
        (JobKind.VERIFY, list(step.verifies)),
    ):
        for key in keys:
            tally.record(kind, key, ok=True)
    return tally


def finish(scheduler: LLMDConnectorScheduler, request: Request, status: RequestStatus) -> None:
    request.status = status
    assert scheduler.request_finished(request, DEVICE_BLOCKS) == (False, None)


def assert_holds_nothing(scheduler: LLMDConnectorScheduler, request: Request) -> None:
    """No state, no pinned chunk, and nothing left to send for the request."""
    assert scheduler.state_of(request.request_id) is None
    assert scheduler.offload is not None and scheduler.offload.manager.num_pinned() == 0
    assert scheduler.offload.stores_in_flight(request.request_id) == 0
    leftover = step(scheduler)
    assert not (leftover.recvs or leftover.offload_loads or leftover.shared_loads)
    assert not leftover.releases


def compute_prompt(scheduler: LLMDConnectorScheduler, request_id: str = "first") -> None:
    """A request that computes the whole prompt and stores its full blocks in the host tier."""
    request = make_request(request_id, PROMPT)
    assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
    scheduler.update_state_after_alloc(request, blocks(DEVICE_BLOCKS), 0)
    metadata = step(scheduler, {request_id: len(PROMPT)})
    assert [job.block_id for job in metadata.offload_step.stores] == DEVICE_BLOCKS[:3]
    request.num_computed_tokens = len(PROMPT)
    worker_reports(scheduler, all_done(metadata))
    finish(scheduler, request, RequestStatus.FINISHED_STOPPED)
    assert_holds_nothing(scheduler, request)
    assert scheduler.offload.manager.num_in_host() == 3


def load_from_host(scheduler: LLMDConnectorScheduler, request: Request) -> OffloadLoadSpec:
    """Hit the host tier for the prompt's 3 full blocks and plan their load."""
    assert scheduler.get_num_new_matched_tokens(request, 0) == (FULL, True)
    scheduler.update_state_after_alloc(request, blocks(DEVICE_BLOCKS), FULL)
    assert scheduler.state_of(request.request_id).phase == LoadPhase.LOADING
    [load] = step(scheduler).offload_loads
    assert scheduler.offload.manager.num_pinned() == 3
    return load


def storing(scheduler: LLMDConnectorScheduler) -> tuple[Request, LLMDConnectorMetadata]:
    """Request "r", which hit nothing, computed in one step: its stores planned, unreported."""
    request = make_request("r", PROMPT)
    scheduler.get_num_new_matched_tokens(request, 0)
    scheduler.update_state_after_alloc(request, blocks(DEVICE_BLOCKS), 0)
    return request, step(scheduler, {"r": len(PROMPT)})


def loading_from_host() -> tuple[LLMDConnectorScheduler, Request, OffloadLoadSpec]:
    """A scheduler whose host tier holds the prompt, and request "r" loading it from there."""
    scheduler = make_scheduler(host_slots=HOST_SLOTS)
    compute_prompt(scheduler)
    request = make_request("r", PROMPT)
    return scheduler, request, load_from_host(scheduler, request)


def remote_hit(scheduler: LLMDConnectorScheduler, **changes: Any) -> Request:
    """Request "r" with a prefill's kv_transfer_params (`changes` applied to them), matched:
    every prompt token is to be loaded from the host tier and the prefill."""
    request = make_request("r", PROMPT, remote_prefill_params(PROMPT, **changes))
    assert scheduler.get_num_new_matched_tokens(request, 0) == (len(PROMPT), True)
    return request


# ---- lifecycles ----------------------------------------------------------------------------


def test_device_cache_hit_only():
    scheduler = make_scheduler(host_slots=HOST_SLOTS)
    request = make_request("r", PROMPT)
    # vLLM's prefix cache holds the 3 full blocks; the tiers hold nothing more
    assert scheduler.get_num_new_matched_tokens(request, FULL) == (0, False)
    scheduler.update_state_after_alloc(request, blocks(DEVICE_BLOCKS), 0)
    assert scheduler.state_of("r").phase == LoadPhase.COMPUTING
    metadata = step(scheduler, {"r": len(PROMPT) - FULL})
    request.num_computed_tokens = len(PROMPT)
    worker_reports(scheduler, all_done(metadata))
    finish(scheduler, request, RequestStatus.FINISHED_LENGTH_CAPPED)
    assert_holds_nothing(scheduler, request)


def test_host_tier_hit_and_load():
    scheduler, request, load = loading_from_host()
    assert load.request_id == "r" and load.block_ids == tuple(DEVICE_BLOCKS[:3])
    worker_reports(scheduler, finished_recving={"r"})
    assert scheduler.state_of("r").phase == LoadPhase.COMPUTING
    assert scheduler.offload.manager.num_pinned() == 0
    step(scheduler, {"r": len(PROMPT) - FULL})  # nothing new to store: all in host already
    finish(scheduler, request, RequestStatus.FINISHED_STOPPED)
    assert_holds_nothing(scheduler, request)


def test_files_found_at_start_are_verified_then_loaded_from_disk():
    scheduler = make_scheduler(host_slots=1, disk_blocks=8)
    request = make_request("r", PROMPT)
    infos = [block_info(request, i, BLOCK) for i in range(3)]
    scheduler.offload.manager.add_disk_blocks(zip(request.block_hashes, infos, strict=True))
    # the files were found at start-up: read back first, and the hit is not known until then
    assert scheduler.get_num_new_matched_tokens(request, 0) == (None, False)
    assert scheduler.state_of("r").phase == LoadPhase.ASKED
    metadata = step(scheduler)
    assert list(metadata.offload_step.verifies) == request.block_hashes[:3]
    assert scheduler.get_num_new_matched_tokens(request, 0) == (None, False)  # still reading
    worker_reports(scheduler, all_done(metadata))
    # All three load straight from disk, though the host tier has one slot.
    assert scheduler.get_num_new_matched_tokens(request, 0) == (FULL, True)
    scheduler.update_state_after_alloc(request, blocks(DEVICE_BLOCKS), FULL)
    [load] = step(scheduler).offload_loads
    assert load.block_ids == () and load.disk_block_ids == tuple(DEVICE_BLOCKS[:3])
    assert load.disk_keys == tuple(request.block_hashes[:3])
    assert scheduler.offload.manager.num_pinned() == 3
    reads = JobTally()
    for key in load.disk_keys:
        reads.record(JobKind.DISK_READ, key, ok=True)
    worker_reports(scheduler, reads, finished_recving={"r"})
    finish(scheduler, request, RequestStatus.FINISHED_STOPPED)
    assert_holds_nothing(scheduler, request)
    assert scheduler.offload.manager.num_on_disk() == 3


def test_a_small_host_tier_sends_new_blocks_straight_to_disk():
    """One host slot, pinned by another request's load: the prompt's blocks go to disk through
    the staging slots; one that finds no staging slot either is offered again next step."""
    scheduler = make_scheduler(host_slots=1, disk_blocks=8, staging_slots=2)
    compute_prompt_blocks = make_request("held", PROMPT[:BLOCK])
    assert scheduler.get_num_new_matched_tokens(compute_prompt_blocks, 0) == (0, False)
    scheduler.update_state_after_alloc(compute_prompt_blocks, blocks(DEVICE_BLOCKS), 0)
    first = step(scheduler, {"held": BLOCK})
    worker_reports(scheduler, all_done(first))
    manager = scheduler.offload.manager
    manager.prepare_load(compute_prompt_blocks.block_hashes[:1])  # its slot is pinned
    request = make_request("r", list(range(5000, 5000 + 3 * BLOCK)))
    assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
    scheduler.update_state_after_alloc(request, blocks(DEVICE_BLOCKS), 0)
    metadata = step(scheduler, {"r": 3 * BLOCK})
    assert metadata.offload_step.stores == ()
    assert [job.key for job in metadata.offload_step.disk_stores] == request.block_hashes[:2]
    request.num_computed_tokens = 3 * BLOCK
    worker_reports(scheduler, all_done(metadata))  # written: the staging slots are free again
    later = step(scheduler, {"r": 1})  # the third block is offered again
    assert [job.key for job in later.offload_step.disk_stores] == request.block_hashes[2:3]
    worker_reports(scheduler, all_done(later))
    finish(scheduler, request, RequestStatus.FINISHED_STOPPED)
    assert manager.lookup(request.block_hashes) == (0, 3)
    assert step(scheduler).offload_step.num_dropped == 0
    manager.complete_load(compute_prompt_blocks.block_hashes[:1])
    finish(scheduler, compute_prompt_blocks, RequestStatus.FINISHED_STOPPED)
    assert manager.num_pinned() == 0 and manager.num_staging_in_use() == 0


def test_blocks_no_slot_took_before_the_request_ended_are_counted_dropped():
    scheduler = make_scheduler(host_slots=1)  # no disk tier: nowhere else to go
    held = make_request("held", PROMPT[:BLOCK])
    scheduler.get_num_new_matched_tokens(held, 0)
    scheduler.update_state_after_alloc(held, blocks(DEVICE_BLOCKS), 0)
    worker_reports(scheduler, all_done(step(scheduler, {"held": BLOCK})))
    scheduler.offload.manager.prepare_load(held.block_hashes[:1])
    request = make_request("r", list(range(5000, 5000 + 3 * BLOCK)))
    scheduler.get_num_new_matched_tokens(request, 0)
    scheduler.update_state_after_alloc(request, blocks(DEVICE_BLOCKS), 0)
    metadata = step(scheduler, {"r": 3 * BLOCK})
    assert metadata.offload_step.stores == () and metadata.offload_step.disk_stores == ()
    request.num_computed_tokens = 3 * BLOCK
    finish(scheduler, request, RequestStatus.FINISHED_STOPPED)
    assert step(scheduler).offload_step.num_dropped == 3
    assert step(scheduler).offload_step.num_dropped == 0  # counted once


def test_remote_pull_after_the_local_tiers():
    scheduler = make_scheduler(host_slots=HOST_SLOTS, consumer=True)
    compute_prompt(scheduler)
    scheduler.offload.manager.reset()  # keep nothing in host...
    assert scheduler.offload.manager.num_in_host() == 0
    request = make_request("r", PROMPT, remote_prefill_params(PROMPT))
    assert scheduler.get_num_new_matched_tokens(request, BLOCK) == (len(PROMPT) - BLOCK, True)
    scheduler.update_state_after_alloc(request, blocks(DEVICE_BLOCKS), len(PROMPT) - BLOCK)
    metadata = step(scheduler)
    [recv] = metadata.recvs
    # ...so the pull covers all but the device cache's first block
    assert recv.local_block_ids == tuple(DEVICE_BLOCKS[1:]) and recv.remote_block_ids == (8, 9, 10)
    assert recv.num_tokens == len(PROMPT) - BLOCK and not metadata.releases
    worker_reports(scheduler, finished_recving={"r"})
    assert scheduler.state_of("r").phase == LoadPhase.COMPUTING
    finish(scheduler, request, RequestStatus.FINISHED_STOPPED)
    assert_holds_nothing(scheduler, request)  # the worker's pull released the prefill


def test_host_tier_first_then_remote_pull_for_the_rest():
    scheduler = make_scheduler(host_slots=HOST_SLOTS, consumer=True)
    compute_prompt(scheduler)
    request = remote_hit(scheduler)
    scheduler.update_state_after_alloc(request, blocks(DEVICE_BLOCKS), len(PROMPT))
    metadata = step(scheduler)
    [load], [recv] = metadata.offload_loads, metadata.recvs
    assert load.block_ids == tuple(DEVICE_BLOCKS[:3])
    assert recv.local_block_ids == (DEVICE_BLOCKS[3],) and recv.remote_block_ids == (10,)
    assert recv.num_tokens == len(PROMPT) - FULL
    worker_reports(scheduler, finished_recving={"r"})  # one report for the load's parts
    finish(scheduler, request, RequestStatus.FINISHED_STOPPED)
    assert_holds_nothing(scheduler, request)


def test_abort_before_alloc_releases_the_prefill_and_pins_nothing():
    scheduler = make_scheduler(host_slots=HOST_SLOTS, consumer=True)
    compute_prompt(scheduler)
    request = remote_hit(scheduler)
    assert scheduler.state_of("r").phase == LoadPhase.MATCHED
    request.status = RequestStatus.FINISHED_ABORTED
    assert scheduler.request_finished(request, []) == (False, None)
    [release] = step(scheduler).releases
    assert release.transfer_id == "t" * 32 and "FINISHED_ABORTED" in release.reason
    assert_holds_nothing(scheduler, request)


def test_abort_while_loading_keeps_the_pins_until_the_load_ends():
    scheduler, request, _ = loading_from_host()
    request.status = RequestStatus.FINISHED_ABORTED
    assert scheduler.request_finished(request, DEVICE_BLOCKS) == (False, None)
    # the worker still copies from those host slots: nothing is unpinned yet
    assert scheduler.state_of("r").phase == LoadPhase.ABORTED
    assert scheduler.offload.manager.num_pinned() == 3
    worker_reports(scheduler, finished_recving={"r"})
    assert_holds_nothing(scheduler, request)


def test_preempted_request_comes_back_and_finishes_once():
    scheduler = make_scheduler(host_slots=HOST_SLOTS, consumer=True)
    compute_prompt(scheduler)
    request = remote_hit(scheduler)
    scheduler.update_state_after_alloc(request, blocks(DEVICE_BLOCKS), len(PROMPT))
    assert len(step(scheduler).recvs) == 1
    worker_reports(scheduler, finished_recving={"r"})
    request.num_computed_tokens = len(PROMPT)
    # preempted: vLLM frees its blocks, resets it and asks again (no request_finished)
    request.num_computed_tokens, request.status = 0, RequestStatus.PREEMPTED
    assert scheduler.get_num_new_matched_tokens(request, 0) == (FULL, True)  # host only
    scheduler.update_state_after_alloc(request, blocks(DEVICE_BLOCKS), FULL)
    metadata = step(scheduler)
    assert len(metadata.offload_loads) == 1 and not metadata.recvs  # pulled once, never again
    worker_reports(scheduler, finished_recving={"r"})
    finish(scheduler, request, RequestStatus.FINISHED_STOPPED)
    assert_holds_nothing(scheduler, request)


def test_stores_run_behind_the_steps_until_their_blocks_may_be_reused():
    """A running request's stores never hold up the next forward; once a request whose stores
    are still in flight ends, the next step waits for them before vLLM may reuse its blocks."""
    scheduler = make_scheduler(host_slots=HOST_SLOTS)
    request = make_request("r", PROMPT)
    assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
    scheduler.update_state_after_alloc(request, blocks(DEVICE_BLOCKS), 0)
    stored = step(scheduler, {"r": len(PROMPT)})
    assert len(stored.offload_step.stores) == 3 and not stored.offload_step.flush_first
    request.num_computed_tokens = len(PROMPT)
    assert scheduler.offload.stores_in_flight("r") == 3
    assert not step(scheduler, {"r": 1}).offload_step.flush_first  # decoding: no wait
    finish(scheduler, request, RequestStatus.FINISHED_STOPPED)
    assert step(scheduler).offload_step.flush_first  # its blocks may go to another request
    assert not step(scheduler).offload_step.flush_first  # once
    worker_reports(scheduler, all_done(stored))  # reported late: stored all the same
    assert scheduler.offload.manager.num_in_host() == 3
    assert_holds_nothing(scheduler, request)


def test_stores_reported_before_the_end_need_no_wait():
    scheduler = make_scheduler(host_slots=HOST_SLOTS)
    compute_prompt(scheduler)  # stored, reported, finished
    assert not step(scheduler).offload_step.flush_first


def test_a_preempted_request_with_stores_in_flight_waits_in_the_same_step():
    """vLLM frees a preempted request's blocks in the schedule that preempts it and may give
    them to another request in that very step: its forward must wait for the stores."""
    scheduler = make_scheduler(host_slots=HOST_SLOTS)
    request, stored = storing(scheduler)
    request.num_computed_tokens = len(PROMPT)
    assert step(scheduler, preempted={"r"}).offload_step.flush_first
    worker_reports(scheduler, all_done(stored))
    request.num_computed_tokens, request.status = 0, RequestStatus.PREEMPTED
    assert scheduler.get_num_new_matched_tokens(request, 0) == (FULL, True)  # stored: a hit
    scheduler.update_state_after_alloc(request, blocks(DEVICE_BLOCKS), FULL)
    [_] = step(scheduler).offload_loads
    worker_reports(scheduler, finished_recving={"r"})
    finish(scheduler, request, RequestStatus.FINISHED_STOPPED)
    assert_holds_nothing(scheduler, request)


def test_the_scheduler_half_reports_tier_occupancy_when_it_changes():
    scheduler = make_scheduler(host_slots=HOST_SLOTS)
    first = scheduler.take_stats()
    assert first is not None and first.data["offload_host_chunks"] == 0
    assert first.data["offload_host_capacity_chunks"] == HOST_SLOTS
    assert scheduler.take_stats() is None  # nothing changed: nothing sent
    compute_prompt(scheduler)
    stats = scheduler.take_stats()
    assert stats is not None and stats.data["offload_host_chunks"] == 3
    assert stats.data["offload_disk_chunks"] == 0


def test_the_scheduler_half_reports_the_chunks_copies_in_flight_hold():
    """A leak check for operators: llmd:offload_busy_chunks is 0 whenever no copy runs."""
    scheduler = make_scheduler(host_slots=HOST_SLOTS)
    assert scheduler.take_stats().data["offload_busy_chunks"] == 0
    request, stored = storing(scheduler)
    stats = scheduler.take_stats()
    in_flight = len(stored.offload_step.stores) + len(stored.offload_step.disk_stores)
    assert in_flight > 0 and stats is not None
    assert stats.data["offload_busy_chunks"] == in_flight
    worker_reports(scheduler, all_done(stored))
    stats = scheduler.take_stats()
    assert stats is not None and stats.data["offload_busy_chunks"] == 0
    finish(scheduler, request, RequestStatus.FINISHED_STOPPED)
    assert_holds_nothing(scheduler, request)


def test_a_vllm_that_does_not_name_preempted_requests_waits_for_stores_every_step():
    scheduler = make_scheduler(host_slots=HOST_SLOTS)
    request, stored = storing(scheduler)
    request.num_computed_tokens = len(PROMPT)
    block_state = SimpleNamespace(get_block_ids=lambda request_id: (DEVICE_BLOCKS,))
    output = SimpleNamespace(kv_connector_block_state=block_state, num_scheduled_tokens={"r": 1})
    assert scheduler.build_connector_meta(output).offload_step.flush_first  # in flight: wait
    worker_reports(scheduler, all_done(stored))
    assert not scheduler.build_connector_meta(output).offload_step.flush_first  # none left
    finish(scheduler, request, RequestStatus.FINISHED_STOPPED)
    assert_holds_nothing(scheduler, request)


def test_failed_load_unpins_and_the_request_recomputes():
    scheduler, request, _ = loading_from_host()
    worker_reports(scheduler, finished_recving={"r"}, failed_recving={"r"})
    assert scheduler.state_of("r").phase == LoadPhase.COMPUTING
    assert scheduler.offload.manager.num_pinned() == 0
    finish(scheduler, request, RequestStatus.FINISHED_STOPPED)
    assert_holds_nothing(scheduler, request)


def test_failed_pull_ends_like_any_load():
    scheduler = make_scheduler(host_slots=HOST_SLOTS, consumer=True)
    request = remote_hit(scheduler)
    scheduler.update_state_after_alloc(request, blocks(DEVICE_BLOCKS), len(PROMPT))
    assert len(step(scheduler).recvs) == 1
    worker_reports(scheduler, finished_recving={"r"}, failed_recving={"r"})
    request.status = RequestStatus.FINISHED_ERROR  # kv_load_failure_policy=fail
    assert scheduler.request_finished(request, DEVICE_BLOCKS) == (False, None)
    assert_holds_nothing(scheduler, request)


@pytest.mark.parametrize(
    "changes", [{"llmd_prompt_digest": prompt_digest([1, 2])}, {"llmd_ports": []}]
)
def test_rejected_params_load_only_from_the_tiers(changes):
    scheduler = make_scheduler(host_slots=HOST_SLOTS, consumer=True)
    compute_prompt(scheduler)
    request = make_request("r", PROMPT, remote_prefill_params(PROMPT, **changes))
    assert scheduler.get_num_new_matched_tokens(request, 0) == (FULL, True)
    scheduler.update_state_after_alloc(request, blocks(DEVICE_BLOCKS), FULL)
    metadata = step(scheduler)
    assert len(metadata.offload_loads) == 1 and not metadata.recvs
    # a release only for params that parsed (ports did not), and only once
    assert len(metadata.releases) == (0 if "llmd_ports" in changes else 1)
    worker_reports(scheduler, finished_recving={"r"})
    finish(scheduler, request, RequestStatus.FINISHED_STOPPED)
    assert_holds_nothing(scheduler, request)


def test_a_remote_hit_vllm_does_not_load_releases_the_prefill_at_once():
    # vLLM may load nothing (num_external_tokens 0) after a hit; the prefill's blocks used to
    # stay held until its lease expired: the release went out without its parsed params.
    scheduler = make_scheduler(host_slots=HOST_SLOTS, consumer=True)
    request = remote_hit(scheduler)
    scheduler.update_state_after_alloc(request, blocks(DEVICE_BLOCKS), 0)
    metadata = step(scheduler)
    assert not metadata.recvs
    [release] = metadata.releases
    assert release.transfer_id == "t" * 32 and release.ports == (5701,)
    assert release.reason == "the decode instance did not load it"
    finish(scheduler, request, RequestStatus.FINISHED_STOPPED)
    assert_holds_nothing(scheduler, request)


@pytest.mark.parametrize(
    "tier", [OffloadPlanner, SharedTierPlanner, RemotePrefillPlanner], ids=lambda t: t.__name__
)
def test_every_tier_implements_the_tier_protocol(tier):
    hooks = [name for name in vars(TierPlanner) if not name.startswith("_")]
    assert len(hooks) == 8
    for name in hooks:
        wanted = list(inspect.signature(getattr(TierPlanner, name)).parameters)
        assert list(inspect.signature(getattr(tier, name)).parameters) == wanted, name
