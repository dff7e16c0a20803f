"""The offload worker's byte paths that need no host slot: stores straight to disk through the
staging slots, and loads that read disk files into the device cache in pieces. Real tensors
(a paged CPU KV cache), real files under tmp_path; the results are what the worker reports."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import factories
import pytest
import torch

from vllm_llmd.job_tally import JobKind
from vllm_llmd.offload.disk_store import DiskBlockStore
from vllm_llmd.offload.jobs import DiskStoreJob, OffloadLoadSpec, OffloadStepSpec, StoreJob
from vllm_llmd.offload.worker import DISK_LOAD_PIECE_BLOCKS, OffloadWorker, all_of
from vllm_llmd.ops import PagedKVCache, gather_blocks
from vllm_llmd.ops.layouts import KVCacheShape

NUM_BLOCKS = 40


def key(i: int) -> bytes:
    return hashlib.sha256(f"block {i}".encode()).digest()


def block_bytes_of(cache: PagedKVCache, block_id: int) -> torch.Tensor:
    out = torch.empty(cache.block_bytes, dtype=torch.uint8)
    gather_blocks(cache, [block_id], out)
    return out


@pytest.fixture
def worker(tmp_path: Path):
    shape = KVCacheShape(num_layers=2, num_blocks=NUM_BLOCKS, num_heads=2, block_size=4, content=8)
    _, cache = factories.make_paged_cache("LBHNC", shape, seed=0)
    fingerprint = factories.make_fingerprint(
        num_layers=2, page_bytes=cache.page_bytes, tensor_parallel_size=1
    )
    store = DiskBlockStore(tmp_path / "tier", fingerprint, 0, cache.block_bytes)
    worker = OffloadWorker(
        cache, num_host_slots=2, disk=store, num_disk_threads=2, num_staging_slots=4
    )
    yield worker
    worker.shutdown()


def wait_results(worker: OffloadWorker, kind: JobKind, count: int) -> dict[bytes, list[int]]:
    """The worker's reports of `kind` once `count` keys were reported."""
    deadline = time.monotonic() + 10
    seen: dict[bytes, list[int]] = {}
    while time.monotonic() < deadline:
        for k, per_key in worker.take_results().counts.items():
            if k is kind:
                seen.update(per_key)
        if len(seen) >= count:
            return seen
        time.sleep(0.01)
    raise AssertionError(f"only {len(seen)} of {count} {kind} reports came")


def test_stores_straight_to_disk_write_the_device_blocks(worker):
    cache = worker.kv_cache
    stores = tuple(DiskStoreJob(key(i), block_id=10 + i, staging_slot=i, info="") for i in range(4))
    worker.submit_step(OffloadStepSpec(disk_stores=stores))
    worker.flush_stores()  # the device blocks were copied out: vLLM may reuse them now
    reports = wait_results(worker, JobKind.SPILL, 4)
    assert all(reports[key(i)] == [1, 0] for i in range(4))
    for i in range(4):
        assert torch.equal(worker.disk.read(key(i)), block_bytes_of(cache, 10 + i))


def test_a_load_reads_host_slots_and_disk_files_in_pieces_byte_exact(worker):
    cache = worker.kv_cache
    num_disk = DISK_LOAD_PIECE_BLOCKS * 2 + 3  # more than one piece, and a partial one
    for i in range(num_disk):
        worker.disk.write(key(i), block_bytes_of(cache, i))
    worker.submit_step(OffloadStepSpec(stores=(StoreJob(key(100), block_id=19, slot=1),)))
    worker.flush_stores()
    wait_results(worker, JobKind.STORE, 1)
    expected = [block_bytes_of(cache, 19)] + [block_bytes_of(cache, i) for i in range(num_disk)]
    targets = list(range(NUM_BLOCKS - num_disk - 1, NUM_BLOCKS))  # none is a source
    load = OffloadLoadSpec(
        "r",
        block_ids=(targets[0],),
        slots=(1,),
        disk_block_ids=tuple(targets[1:]),
        disk_keys=tuple(key(i) for i in range(num_disk)),
    )
    worker.load(load).result(timeout=10)
    for block, want in zip(targets, expected, strict=True):
        assert torch.equal(block_bytes_of(cache, block), want), block
    reads = wait_results(worker, JobKind.DISK_READ, num_disk)
    assert all(reads[key(i)] == [1, 0] for i in range(num_disk))


def test_a_load_never_waits_behind_a_steps_stores(worker, monkeypatch):
    """Stores run behind the steps now (no flush each step): a re-hit's load must not queue
    behind them. A store held up in its copy; a host load and a disk load finish meanwhile."""
    cache = worker.kv_cache
    worker.submit_step(OffloadStepSpec(stores=(StoreJob(key(100), block_id=3, slot=0),)))
    worker.flush_stores()
    wait_results(worker, JobKind.STORE, 1)  # slot 0 holds block 3's bytes
    worker.disk.write(key(7), block_bytes_of(cache, 7))
    release = threading.Event()
    gather = worker._gather

    def slow_gather(pool, blocks_and_slots, after):
        release.wait(10)  # a store that takes its time
        return gather(pool, blocks_and_slots, after)

    monkeypatch.setattr(worker, "_gather", slow_gather)
    worker.submit_step(OffloadStepSpec(stores=(StoreJob(key(101), block_id=5, slot=1),)))
    load = OffloadLoadSpec(
        "r", block_ids=(30,), slots=(0,), disk_block_ids=(31,), disk_keys=(key(7),)
    )
    try:
        worker.load(load).result(timeout=5)  # would time out queued behind the store
        assert torch.equal(block_bytes_of(cache, 30), block_bytes_of(cache, 3))
        assert torch.equal(block_bytes_of(cache, 31), block_bytes_of(cache, 7))
    finally:
        release.set()
    worker.flush_stores()
    assert wait_results(worker, JobKind.STORE, 1)[key(101)] == [1, 0]


def test_a_bad_file_fails_the_load_and_is_reported_with_the_others(worker):
    cache = worker.kv_cache
    for i in range(3):
        worker.disk.write(key(i), block_bytes_of(cache, i))
    path = worker.disk.path_for(key(1))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # a flipped payload byte
    path.write_bytes(bytes(data))
    load = OffloadLoadSpec(
        "r", (), (), disk_block_ids=(20, 21, 22), disk_keys=(key(0), key(1), key(2))
    )
    with pytest.raises(RuntimeError, match="1 disk blocks unreadable"):
        worker.load(load).result(timeout=10)
    reads = wait_results(worker, JobKind.DISK_READ, 3)
    assert reads[key(0)] == [1, 0] and reads[key(1)] == [0, 1] and reads[key(2)] == [1, 0]
    assert not path.exists()  # deleted: the scheduler forgets it on the report


def test_all_of_waits_for_every_part_and_fails_with_the_first_failure():
    from concurrent.futures import Future

    assert all_of([]).done()
    parts: list[Future[None]] = [Future(), Future()]
    combined = all_of(parts)
    parts[1].set_exception(ValueError("disk"))
    assert not combined.done()
    parts[0].set_result(None)
    with pytest.raises(ValueError, match="disk"):
        combined.result(timeout=1)
