"""Worker side of the offload tiers: the host pool, the disk store, and the threads moving bytes.

`OffloadWorker` executes what the scheduler half planned (`OffloadStepSpec` plus loads) and
reports which blocks completed (`JobTally`). All copies that touch the host pool run on one
ordered thread, so a step's spills copy their slots out before that step's stores or
promotions overwrite them; disk reads and writes run on a small pool. Stores read device
blocks vLLM may reuse once the step ends, so the next step flushes them (`flush_stores`) before
its forward runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from vllm_llmd.hashing import BlockHash
from vllm_llmd.job_tally import JobKind, JobTally
from vllm_llmd.log import ThrottledLog, get_logger
from vllm_llmd.offload.disk_store import DiskBlockStore
from vllm_llmd.offload.jobs import OffloadStepSpec, SpillJob, StoreJob
from vllm_llmd.ops import PagedKVCache, gather_blocks, scatter_blocks

logger = get_logger(__name__)


class OffloadWorker:
    """Host pool + disk store of one worker, and the copies between them and the KV cache."""

    def __init__(
        self,
        kv_cache: PagedKVCache,
        num_host_slots: int,
        disk: DiskBlockStore | None,
        num_disk_threads: int,
    ) -> None:
        self.kv_cache = kv_cache
        self.block_bytes = kv_cache.block_bytes
        pin = kv_cache.device.type == "cuda"  # pinned host memory lets the kernels DMA
        self.host = torch.empty(
            (num_host_slots, self.block_bytes), dtype=torch.uint8, pin_memory=pin
        )
        self.disk = disk
        self._copier = ThreadPoolExecutor(1, "llmd-offload-copy")
        self._disk_pool = ThreadPoolExecutor(num_disk_threads, "llmd-offload-disk")
        self._pending_stores: Future[None] | None = None
        self._lock = threading.Lock()
        # this worker's completions since the last take_results
        self._results = JobTally()
        self._write_failures = ThrottledLog(logger)

    # ---- a step's plan -------------------------------------------------------------------

    def submit_step(self, step: OffloadStepSpec) -> None:
        """Run a step's plan in order: spills, promotions, deletes, stores."""
        if step.is_empty():
            return
        self._pending_stores = self._copier.submit(self._run_step, step)

    def flush_stores(self) -> None:
        """Wait until the last step's device → host copies are done (its blocks may be reused).

        Never raises: a failed copy was reported per block; the engine step must go on."""
        pending, self._pending_stores = self._pending_stores, None
        if pending is None:
            return
        try:
            pending.result()
        except Exception:
            logger.exception("LLMDConnector: an offload step failed")

    def _run_step(self, step: OffloadStepSpec) -> None:
        # Every block of the plan gets a result, failed or not: the scheduler unpins on it.
        self._spill(step.spills)
        for promote in step.promotes:
            self._on_disk(
                JobKind.PROMOTE, promote.key, self._read, promote.key, self.host[promote.slot]
            )
        for key in step.deletes:
            self._disk_pool.submit(self._delete, key)
        if step.stores:
            try:
                self._store(step.stores)
                ok = True
            except Exception:
                logger.exception(
                    "LLMDConnector: offload store of %d blocks failed", len(step.stores)
                )
                ok = False
            for store in step.stores:
                self._record(JobKind.STORE, store.key, ok)

    def _spill(self, spills: Sequence[SpillJob]) -> None:
        if not spills:
            return
        try:
            slots = torch.tensor([spill.slot for spill in spills])
            copies = self.host.index_select(0, slots)  # out of the pool before reuse
        except Exception:
            logger.exception("LLMDConnector: copying %d blocks out to spill failed", len(spills))
            copies = None
        for i, spill in enumerate(spills):
            if copies is None:
                self._record(JobKind.SPILL, spill.key, False)
            else:
                self._on_disk(
                    JobKind.SPILL, spill.key, self._write, spill.key, copies[i], spill.info
                )

    def _store(self, stores: Sequence[StoreJob]) -> None:
        # Slots come off the free list mostly in runs: gather each run straight into the pool.
        blocks = [store.block_id for store in stores]
        for first, last, slot in slot_runs([store.slot for store in stores]):
            gather_blocks(self.kv_cache, blocks[first:last], self.host[slot : slot + last - first])
        if self.kv_cache.device.type == "cuda":
            torch.cuda.current_stream(self.kv_cache.device).synchronize()

    # ---- loads ---------------------------------------------------------------------------

    def load(self, block_ids: Sequence[int], slots: Sequence[int]) -> Future[None]:
        """Copy host slots into device blocks, after every store and promotion queued before."""
        return self._copier.submit(self._load, list(block_ids), list(slots))

    def _load(self, block_ids: list[int], slots: list[int]) -> None:
        for first, last, slot in slot_runs(slots):
            source = self.host[slot : slot + last - first]
            scatter_blocks(self.kv_cache, block_ids[first:last], source)
        if self.kv_cache.device.type == "cuda":
            # The kernels read the pinned pool in place: done before the slots can be reused.
            torch.cuda.current_stream(self.kv_cache.device).synchronize()

    # ---- disk ----------------------------------------------------------------------------

    def _on_disk(
        self, kind: JobKind, key: BlockHash, fn: Callable[..., object], *args: object
    ) -> None:
        future = self._disk_pool.submit(fn, *args)
        future.add_done_callback(lambda f: self._record(kind, key, f.exception() is None))

    def _write(self, key: BlockHash, data: torch.Tensor, info: str) -> None:
        assert self.disk is not None
        try:
            self.disk.write(key, data, info)
        except Exception as exc:  # a full or read-only disk fails every write: say so, once
            self._write_failures.warning(
                "LLMDConnector: disk tier write to %s failed: %s; that block is not on disk",
                self.disk.root,
                exc,
            )
            raise

    def _read(self, key: BlockHash, out: torch.Tensor) -> None:
        assert self.disk is not None
        try:
            self.disk.read(key, out=out)
        except Exception as exc:
            logger.warning(
                "LLMDConnector: disk tier file of block %s rejected: %s", key.hex()[:16], exc
            )
            raise

    def _delete(self, key: BlockHash) -> None:
        assert self.disk is not None
        self.disk.delete(key)

    # ---- results -------------------------------------------------------------------------

    def _record(self, kind: JobKind, key: BlockHash, ok: bool) -> None:
        with self._lock:
            self._results.record(kind, key, ok)

    def take_results(self) -> JobTally:
        """This worker's completions since the last call."""
        with self._lock:
            results, self._results = self._results, JobTally()
        return results

    def shutdown(self) -> None:
        self._copier.shutdown(wait=True, cancel_futures=True)
        self._disk_pool.shutdown(wait=True, cancel_futures=True)


def slot_runs(slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """Split slots into runs of consecutive slots: (first index, end index, first slot)."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[i - 1] + 1:
            runs.append((start, i, slots[start]))
            start = i
    return runs
