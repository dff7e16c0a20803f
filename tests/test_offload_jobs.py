"""Typed step jobs and the one completion tally: workers' reports add up across TP ranks (vLLM's
`aggregate`), a job completes once every worker reported it and fails if any failed, and the
step messages survive vLLM's own trip between processes."""

from __future__ import annotations

import pickle

from vllm_llmd.connector.metadata import LLMDConnectorMetadata, LLMDWorkerMetadata
from vllm_llmd.job_tally import JobKind, JobTally
from vllm_llmd.offload.jobs import (
    DiskStoreJob,
    OffloadLoadSpec,
    OffloadStepSpec,
    SpillJob,
    StoreJob,
)
from vllm_llmd.offload.manager import OffloadManager
from vllm_llmd.offload.planner import OffloadPlanner

KEYS = [bytes([i]) * 32 for i in range(4)]


def test_tally_merges_and_settles_once_every_worker_reported():
    rank0, rank1 = JobTally(), JobTally()
    rank0.record(JobKind.STORE, KEYS[0], ok=True)
    rank0.record(JobKind.STORE, KEYS[1], ok=True)
    rank1.record(JobKind.STORE, KEYS[0], ok=False)
    rank1.record(JobKind.SHARED_STORE, b"req@0", ok=True)
    merged = LLMDWorkerMetadata(rank0).aggregate(LLMDWorkerMetadata(rank1)).results
    assert merged.totals(JobKind.STORE) == (2, 1)
    assert merged.of(JobKind.SHARED_STORE).totals(JobKind.SHARED_STORE) == (1, 0)
    assert merged.take_settled(2) == [(JobKind.STORE, KEYS[0], False)]
    assert merged.take_settled(1) == [
        (JobKind.STORE, KEYS[1], True),
        (JobKind.SHARED_STORE, b"req@0", True),
    ]
    assert merged.is_empty()


def test_offload_store_completes_when_every_tp_rank_reported():
    manager = OffloadManager(num_host_slots=2, num_disk_blocks=0)
    planner = OffloadPlanner(manager, block_size=16, num_workers=2, store_decode=False)
    manager.prepare_store(KEYS[:2])
    reports = [JobTally(), JobTally()]
    for rank, ok in ((0, True), (1, True)):
        reports[rank].record(JobKind.STORE, KEYS[0], ok)
    reports[0].record(JobKind.STORE, KEYS[1], True)
    planner.on_results(reports[0])  # one step: rank 0 only
    assert manager.lookup(KEYS[:2]) == (0, 0) and manager.num_pinned() == 2
    late = JobTally()
    late.record(JobKind.STORE, KEYS[1], False)  # rank 1 fails key 1
    planner.on_results(reports[1].merge(late))
    assert manager.lookup(KEYS[:1]) == (1, 1) and manager.lookup(KEYS[1:2]) == (0, 0)
    assert manager.num_pinned() == 0
    assert planner._reports.is_empty()


def test_step_messages_survive_vllms_trip_between_processes():
    # vLLM pickles SchedulerOutput and the workers' outputs itself (its own MessageQueue)
    step = OffloadStepSpec(
        spills=(SpillJob(KEYS[0], 1, "{}"),),
        verifies=(KEYS[1],),
        stores=(StoreJob(KEYS[2], 7, 3),),
        disk_stores=(DiskStoreJob(KEYS[0], 8, 0, "{}"),),
        deletes=(KEYS[3],),
        num_dropped=2,
    )
    metadata = LLMDConnectorMetadata(
        offload_loads=[OffloadLoadSpec("r", (1, 2), (3, 4), (5,), (KEYS[1],))], offload_step=step
    )
    assert pickle.loads(pickle.dumps(metadata)) == metadata
    tally = JobTally()
    tally.record(JobKind.DISK_READ, KEYS[1], True)
    report = pickle.loads(pickle.dumps(LLMDWorkerMetadata(tally)))
    assert list(report.results) == [(JobKind.DISK_READ, KEYS[1], 1, 0)]
