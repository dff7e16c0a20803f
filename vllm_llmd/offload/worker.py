"""Worker side of the offload tiers: the host pool, the disk store, and the threads moving bytes.

`OffloadWorker` executes what the scheduler half planned (`OffloadStepSpec` plus loads) and
reports which blocks completed (`JobTally`). Each step's plan runs in order on one thread, so a
step's spills copy their slots out before that step's stores overwrite them; its disk writes run
on a small pool. Stores (into host slots, or into staging slots for a write straight to disk)
read device blocks, which stay the request's own until it ends: they run behind the steps, and
a step waits for them (`flush_stores`) only when the scheduler half says that blocks with stores
in flight may be handed to another request (`OffloadStepSpec.flush_first`). On CUDA every
copying thread has a stream of its own, and a step's stores are ordered after its forward by an
event recorded when vLLM hands the step over (`ops/copy_stream.py`): they overlap the next
forward, whichever stream vLLM computes on.

Loads run on threads of their own, so a re-hit never queues behind a step's stores: host slots
on one thread (a load's slots hold stored blocks, pinned: no store or spill touches them), disk
files on a read pool, in pieces of `DISK_LOAD_PIECE_BLOCKS` through a buffer per thread: a disk
hit never needs host slots. Every file a load reads is validated again and reported
(`JobKind.DISK_READ`), so one that turned bad fails the load once and is then forgotten.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from vllm_llmd.hashing import BlockHash, short_hash
from vllm_llmd.job_tally import JobKind, JobTally
from vllm_llmd.log import ThrottledLog, get_logger
from vllm_llmd.offload.disk_store import DiskBlockStore
from vllm_llmd.offload.jobs import DiskStoreJob, OffloadLoadSpec, OffloadStepSpec, SpillJob
from vllm_llmd.ops import PagedKVCache, gather_blocks, scatter_blocks
from vllm_llmd.ops.copy_stream import CopyStreams

logger = get_logger(__name__)

# blocks a disk load reads before one scatter into the device cache (the buffer per disk thread)
DISK_LOAD_PIECE_BLOCKS = 8
# the niceness of the threads that write the disk tier (Linux: per thread)
BACKGROUND_NICE = 10


class OffloadWorker:
    """Host pool + disk store of one worker, and the copies between them and the KV cache."""

    def __init__(
        self,
        kv_cache: PagedKVCache,
        num_host_slots: int,
        disk: DiskBlockStore | None,
        num_disk_threads: int,
        num_staging_slots: int = 0,
    ) -> None:
        self.kv_cache = kv_cache
        self.block_bytes = kv_cache.block_bytes
        self._pin = kv_cache.device.type == "cuda"  # pinned host memory lets the kernels DMA
        self.host = self._host_buffer(num_host_slots)
        # where stores straight to disk wait for their write (slots assigned by the scheduler)
        self.staging = self._host_buffer(num_staging_slots if disk is not None else 0)
        self.disk = disk
        self._disk_thread_state = threading.local()  # each disk thread's read buffer
        # on CUDA, each copying thread's own stream, ordered after the step's forward
        self._streams = CopyStreams(kv_cache.device)
        # a step's plan (spills, stores, deletes), in order; and its disk writes and verifies
        self._copier = ThreadPoolExecutor(1, "llmd-offload-copy")
        self._disk_pool = ThreadPoolExecutor(
            num_disk_threads, "llmd-offload-disk", initializer=background_priority
        )
        # loads: host slots, and disk files
        self._loader = ThreadPoolExecutor(1, "llmd-offload-load")
        self._disk_reads = ThreadPoolExecutor(num_disk_threads, "llmd-offload-disk-read")
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
        after = self._streams.mark()  # the forward that computed the blocks to store
        self._pending_stores = self._copier.submit(self._run_step, step, after)

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

    def _host_buffer(self, num_blocks: int) -> torch.Tensor:
        return torch.empty((num_blocks, self.block_bytes), dtype=torch.uint8, pin_memory=self._pin)

    def _run_step(self, step: OffloadStepSpec, after: torch.cuda.Event | None) -> None:
        # Every block of the plan gets a result, failed or not: the scheduler unpins on it.
        self._spill(step.spills)
        for key in step.verifies:
            self._on_disk(JobKind.VERIFY, key, self._verify, key)
        for key in step.deletes:
            self._disk_pool.submit(self._delete, key)
        if step.stores:
            ok = self._gather(self.host, [(s.block_id, s.slot) for s in step.stores], after)
            for store in step.stores:
                self._record(JobKind.STORE, store.key, ok)
        self._store_to_disk(step.disk_stores, after)

    def _store_to_disk(
        self, stores: Sequence[DiskStoreJob], after: torch.cuda.Event | None
    ) -> None:
        if not stores:
            return
        ok = self._gather(self.staging, [(s.block_id, s.staging_slot) for s in stores], after)
        for store in stores:
            if not ok:
                self._record(JobKind.SPILL, store.key, False)
                continue
            data = self.staging[store.staging_slot]  # not reassigned until the write reported
            self._on_disk(JobKind.SPILL, store.key, self._write, store.key, data, store.info)

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

    def _gather(
        self,
        pool: torch.Tensor,
        blocks_and_slots: Sequence[tuple[int, int]],
        after: torch.cuda.Event | None,
    ) -> bool:
        """Copy device blocks into slots of `pool` (after the forward `after` marks, done when
        this returns); False (logged) if the copy failed."""
        # Slots come off the free list mostly in runs: gather each run straight into the pool.
        blocks = [block for block, _ in blocks_and_slots]
        try:
            with self._streams.copies(after):
                for first, last, slot in slot_runs([slot for _, slot in blocks_and_slots]):
                    pages = pool[slot : slot + last - first]
                    gather_blocks(self.kv_cache, blocks[first:last], pages)
        except Exception:
            logger.exception("LLMDConnector: offload store of %d blocks failed", len(blocks))
            return False
        return True

    # ---- loads ---------------------------------------------------------------------------

    def load(self, spec: OffloadLoadSpec) -> Future[None]:
        """Copy a request's hit into its device blocks: host slots on the load thread, disk
        files on the read pool. Done when both parts are."""
        parts: list[Future[None]] = []
        if spec.block_ids:
            parts.append(self._loader.submit(self._load, list(spec.block_ids), list(spec.slots)))
        if spec.disk_block_ids:
            parts.append(
                self._disk_reads.submit(
                    self._load_from_disk, list(spec.disk_block_ids), list(spec.disk_keys)
                )
            )
        return all_of(parts)

    def _load(self, block_ids: list[int], slots: list[int]) -> None:
        # The kernels read the pinned pool in place: done before the slots can be reused.
        with self._streams.copies():
            for first, last, slot in slot_runs(slots):
                source = self.host[slot : slot + last - first]
                scatter_blocks(self.kv_cache, block_ids[first:last], source)

    def _load_from_disk(self, block_ids: list[int], keys: list[BlockHash]) -> None:
        assert self.disk is not None
        buffer = self._disk_load_buffer()
        failed: Exception | None = None
        for start in range(0, len(keys), len(buffer)):
            piece = keys[start : start + len(buffer)]
            read_ok = [self._read_for_load(key, buffer[i]) for i, key in enumerate(piece)]
            for key, ok in zip(piece, read_ok, strict=True):
                self._record(JobKind.DISK_READ, key, ok)
            if not all(read_ok):
                failed = failed or RuntimeError(f"{read_ok.count(False)} disk blocks unreadable")
                continue  # the other files are still read and reported
            if failed is None:
                ids = block_ids[start : start + len(piece)]
                with self._streams.copies():  # done before the buffer is read into again
                    scatter_blocks(self.kv_cache, ids, buffer[: len(piece)])
        if failed is not None:
            raise failed

    def _read_for_load(self, key: BlockHash, out: torch.Tensor) -> bool:
        try:
            self._read(key, out)
        except Exception:
            return False
        return True

    def _disk_load_buffer(self) -> torch.Tensor:
        buffer: torch.Tensor | None = getattr(self._disk_thread_state, "buffer", None)
        if buffer is None:
            buffer = self._host_buffer(DISK_LOAD_PIECE_BLOCKS)
            self._disk_thread_state.buffer = buffer
        return buffer

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

    def _verify(self, key: BlockHash) -> None:
        self._read(key, self._disk_load_buffer()[0])

    def _read(self, key: BlockHash, out: torch.Tensor) -> None:
        assert self.disk is not None
        try:
            self.disk.read(key, out=out)
        except Exception as exc:
            logger.warning(
                "LLMDConnector: disk tier file of block %s rejected: %s", short_hash(key), exc
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
        for pool in (self._loader, self._disk_reads, self._copier, self._disk_pool):
            pool.shutdown(wait=True, cancel_futures=True)


def background_priority() -> None:
    """Thread initializer: this thread yields the CPU to the engine's own (nice +10).

    No step ever waits for a disk write, spill or delete, yet each costs CPU (serializing,
    checksumming, the kernel's copy into the page cache) on the cores the engine computes on."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    except (OSError, AttributeError):  # not Linux, or not allowed: run at normal priority
        pass


def all_of(futures: Sequence[Future[None]]) -> Future[None]:
    """A future done when every one of `futures` is: failed with the first failure, if any."""
    combined: Future[None] = Future()
    remaining = len(futures)
    lock = threading.Lock()

    def one_done(_: Future[None]) -> None:
        nonlocal remaining
        with lock:
            remaining -= 1
            if remaining:
                return
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            combined.set_exception(errors[0])
        else:
            combined.set_result(None)

    if not futures:
        combined.set_result(None)
    for future in futures:
        future.add_done_callback(one_done)
    return combined


def slot_runs(slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """Split slots into runs of consecutive slots: (first index, end index, first slot)."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[i - 1] + 1:
            runs.append((start, i, slots[start]))
            start = i
    return runs
