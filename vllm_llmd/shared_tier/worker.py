"""Worker side of the shared tier: register the KV layout, store and load chunks.

LMCache's *engine-driven* mode (the one that works on CPU, and on GPU too): the worker copies
the bytes, the server never touches vLLM memory. At start, and again whenever the server comes
back, the worker registers its layout (`register_kv_cache_engine_driven_context`) and maps the
server's L1 pool (`/dev/shm/lmcache_l1_pool_<name>`, shared memory: the server must run with
`--shm-name`, so it must run on this host). On CUDA the blocks go through pinned host staging
(copy kernels, on each copying thread's own stream, stores ordered after the step's forward:
`ops/copy_stream.py`), the chunk permutation through the CPU: the same bytes as on CPU
(`layout.py`). LMCache's own GPU mode (the server reads GPU memory through CUDA IPC) is not
used: one path for both devices, and no server-side GPU context.

- store (after the forward, `submit_stores`): one ordered copy thread gathers the blocks into a
  staging buffer of ours (`gather_blocks`); the next step waits for that copy only
  (`flush_stores`), never for the server. An RPC thread then asks the server for slots
  (`prepare_store`: only chunks it lacks), fills them (`ChunkLayout.to_chunk`) and commits.
  A store that finds the server down, or too many chunks already waiting, is dropped (counted).
- load (`load`, a future): `prepare_retrieve` (the chunks the scheduler's lookup locked) →
  copy out of the slots into staging → `commit_retrieve` (unlocks; not waited for) →
  `scatter_blocks`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from vllm_llmd.log import get_logger
from vllm_llmd.ops import PagedKVCache, gather_blocks, scatter_blocks
from vllm_llmd.ops.copy_stream import CopyStreams
from vllm_llmd.shared_tier.client import SharedTierClient, SharedTierError, SharedTierUnavailable
from vllm_llmd.shared_tier.layout import ChunkLayout
from vllm_llmd.shared_tier.messages import SharedLoadSpec, SharedStoreSpec

logger = get_logger(__name__)

SHM_DIR = "/dev/shm"

Count = Callable[[str, int], None]


class SharedTierWorker:
    """One worker's connection to its LMCache server, and the copies through its pool."""

    def __init__(
        self,
        url: str,
        kv_caches: Mapping[str, torch.Tensor],
        cache: PagedKVCache,
        *,
        model_name: str,
        world_size: int,
        worker_id: int,
        chunk_tokens: int,
        timeout_s: float,
        retry_s: float,
        max_inflight_chunks: int,
        count: Count | None = None,
    ) -> None:
        self.cache = cache
        # on CUDA, staging is pinned host memory: the copy kernels move the blocks, the
        # chunk permutation runs on the CPU (where LMCache's pool is)
        self._pin = cache.device.type == "cuda"
        # on CUDA, each copying thread's own stream, stores ordered after the step's forward
        self._streams = CopyStreams(cache.device)
        self.layout = ChunkLayout.from_kv_caches(kv_caches, cache, chunk_tokens)
        self.model_name = model_name
        self.world_size = world_size
        self.worker_id = worker_id
        self.instance_id = os.getpid()
        self.max_inflight_chunks = max_inflight_chunks
        self._count = count or (lambda key, amount: None)
        # the server's L1 pool as mapped here, and the inode it had (a restart makes a new one)
        self._pool: torch.Tensor | None = None
        self._pool_path = ""
        self._pool_inode = 0
        self._pool_lock = threading.Lock()
        self._copier = ThreadPoolExecutor(1, "llmd-shared-copy")
        self._rpc = ThreadPoolExecutor(1, "llmd-shared-store")
        self._loader = ThreadPoolExecutor(2, "llmd-shared-load")
        self._pending_gather: Future[None] | None = None
        self._inflight_chunks = 0
        # guards _inflight_chunks and _results (stores ended, for the scheduler's events)
        self._inflight_lock = threading.Lock()
        self._results: dict[bytes, list[int]] = {}
        self.client = SharedTierClient(
            url,
            timeout_s,
            retry_s,
            instance_id=self.instance_id,
            on_recover=self._register,
            check=self._pool_replaced,
            chunk_tokens=chunk_tokens,
            name=f"worker{worker_id}",
        )

    # ---- registration --------------------------------------------------------------------

    def _register(self) -> None:
        """Register this worker's layout and map the server's pool (start-up and recovery)."""
        lmc = self.client.lmcache
        layout = self.layout
        payload = lmc.RegisterEngineDrivenContextPayload(
            instance_id=self.instance_id,
            model_name=self.model_name,
            world_size=self.world_size,
            block_size=layout.block_size,
            num_layers=layout.num_layers,
            hidden_dim_size=layout.hidden_dim,
            dtype_str=layout.dtype_name,
            use_mla=True,  # LMCache's name for "one plane" (fused K/V rows: vLLM 0.32+ pages)
            num_physical_slots=layout.chunk_tokens,
        )
        answer = self.client.call(
            "register_kv_cache_engine_driven_context", payload, even_if_down=True
        )
        if not answer.shm_name or answer.pool_size <= 0:
            raise SharedTierError(
                f"LMCache server {self.client.url} has no shared-memory pool: start it with "
                "--shm-name NAME (and --supported-transfer-mode auto)"
            )
        path = os.path.join(SHM_DIR, answer.shm_name.lstrip("/"))
        pool = torch.from_file(path, shared=True, size=answer.pool_size, dtype=torch.uint8)
        with self._pool_lock:
            self._pool, self._pool_path = pool, path
            self._pool_inode = os.stat(path).st_ino
        logger.info(
            "LLMDConnector shared tier: worker %d registered with %s (pool %s, %.0f MiB; "
            "chunks of %d tokens, %.2f MiB)",
            self.worker_id,
            self.client.url,
            path,
            answer.pool_size / 2**20,
            layout.chunk_tokens,
            layout.chunk_bytes / 2**20,
        )

    def _pool_replaced(self) -> str | None:
        """Why the mapped pool is stale (the server restarted), or None."""
        with self._pool_lock:
            path, inode = self._pool_path, self._pool_inode
        if not path:
            return None
        try:
            if os.stat(path).st_ino == inode:
                return None
        except FileNotFoundError:
            return f"its shared-memory pool {path} is gone"
        return f"its shared-memory pool {path} was made anew (server restarted)"

    def _slot(self, pool: torch.Tensor, slot: Mapping[str, Any]) -> torch.Tensor:
        """A chunk object in the pool, checked against our layout."""
        layout = self.layout
        shape, dtype = tuple(slot["shape"]), str(slot["dtype"])
        offset, length = int(slot["offset"]), int(slot["length"])
        if shape != layout.chunk_shape or dtype != layout.dtype_name:
            raise SharedTierError(
                f"server slot {shape} {dtype} != our chunk {layout.chunk_shape} {layout.dtype_name}"
            )
        if length != layout.chunk_bytes or offset < 0 or offset + length > pool.numel():
            raise SharedTierError(f"server slot at {offset}+{length} is outside its pool")
        return pool[offset : offset + length].view(layout.dtype).view(layout.chunk_shape)

    def _current_pool(self) -> torch.Tensor:
        with self._pool_lock:
            pool = self._pool
        if pool is None:
            raise SharedTierUnavailable("not registered with the LMCache server yet")
        return pool

    def _key(
        self, request_id: str, token_ids: Sequence[int], start: int, end: int, salt: str
    ) -> Any:
        return self.client.lmcache.IPCCacheServerKey(
            model_name=self.model_name,
            world_size=self.world_size,
            worker_id=self.worker_id,
            token_ids=tuple(token_ids),
            start=start,
            end=end,
            request_id=request_id,
            cache_salt=salt,
            num_kv_readers=self.world_size,
        )

    def _failed(self, what: str, exc: Exception) -> None:
        """A call failed while the server answers: a lost registration is redone."""
        if "not registered" in str(exc) or "reaped" in str(exc):
            self.client.mark_down("it lost this worker's registration (restarted?)")
        elif not isinstance(exc, SharedTierUnavailable):
            logger.warning("LLMDConnector shared tier: %s failed: %s", what, exc)

    def _staging(self, num_blocks: int) -> torch.Tensor:
        return torch.empty(
            self.cache.buffer_bytes(num_blocks), dtype=torch.uint8, pin_memory=self._pin
        )

    # ---- stores --------------------------------------------------------------------------

    def submit_stores(self, stores: Sequence[SharedStoreSpec]) -> None:
        """After the forward: gather these blocks now (off-thread), send them after."""
        accepted = []
        for spec in stores:
            num_chunks = len(spec.block_ids) // self.layout.blocks_per_chunk
            with self._inflight_lock:
                room = self._inflight_chunks + num_chunks <= self.max_inflight_chunks
                if room and self.client.is_up:
                    self._inflight_chunks += num_chunks
                    accepted.append(spec)
                    continue
            self._count("shared_stores_dropped", num_chunks)
            self._report(spec, ok=False)
        if accepted:
            after = self._streams.mark()  # the forward that computed these blocks
            self._pending_gather = self._copier.submit(self._gather_all, accepted, after)

    def flush_stores(self) -> None:
        """Before the next forward: the last step's blocks have been copied out. Never raises."""
        pending, self._pending_gather = self._pending_gather, None
        if pending is None:
            return
        try:
            pending.result()
        except Exception:
            logger.exception("LLMDConnector shared tier: gathering blocks to store failed")

    def _gather_all(self, stores: list[SharedStoreSpec], after: torch.cuda.Event | None) -> None:
        for spec in stores:
            try:
                staging = self._staging(len(spec.block_ids))
                with self._streams.copies(after):
                    gather_blocks(self.cache, list(spec.block_ids), staging)
            except Exception:
                logger.exception("LLMDConnector shared tier: gathering blocks to store failed")
                self._store_done(spec, 0, failed=True)
                continue
            self._rpc.submit(self._store, spec, staging)

    def _store(self, spec: SharedStoreSpec, staging: torch.Tensor) -> None:
        # a session of its own, ended here: the scheduler ends the request's lookup session
        session = f"{spec.request_id}/store/{spec.start}"
        written, failed = 0, True
        try:
            written, failed = self._store_chunks(spec, session, staging), False
        except Exception as exc:
            self._failed(f"store of request {spec.request_id} tokens {spec.start}..{spec.end}", exc)
        finally:
            self._store_done(spec, written, failed)
            try:
                self.client.submit("end_session", session)
            except SharedTierError:
                pass  # the server's session TTL removes it

    def _store_chunks(self, spec: SharedStoreSpec, session: str, staging: torch.Tensor) -> int:
        """Chunks written (the server asks only for those it lacks)."""
        key = self._key(session, spec.token_ids, spec.start, spec.end, spec.cache_salt)
        pool = self._current_pool()
        answer = self.client.call("prepare_store", key, self.instance_id)
        slots = answer.context.get("slots")
        if slots is None:
            raise SharedTierError("prepare_store gave no shared-memory slots")
        if not slots:
            return 0
        chunk_bytes = self.layout.chunk_bytes
        num_chunks = staging.numel() // chunk_bytes
        for slot, index in zip(slots, answer.context["chunk_indices"], strict=True):
            # a negative or past-the-end index would slice another chunk, or none, silently
            if isinstance(index, bool) or not isinstance(index, int):
                raise SharedTierError(f"prepare_store asked for chunk {index!r}, not an index")
            if not 0 <= index < num_chunks:
                raise SharedTierError(f"prepare_store asked for chunk {index} of {num_chunks}")
            chunk = staging[index * chunk_bytes : (index + 1) * chunk_bytes]
            self.layout.to_chunk(chunk, self._slot(pool, slot))
        if not self.client.call("commit_store", key, self.instance_id, b""):
            raise SharedTierError("commit_store refused")
        return len(slots)

    def _store_done(self, spec: SharedStoreSpec, written: int, failed: bool) -> None:
        num_chunks = len(spec.block_ids) // self.layout.blocks_per_chunk
        with self._inflight_lock:
            self._inflight_chunks -= num_chunks
        if failed:
            self._count("shared_store_failures", num_chunks)
        else:
            self._count("shared_stored_chunks", written)
            self._count("shared_store_skipped_chunks", num_chunks - written)
        self._report(spec, ok=not failed)

    def _report(self, spec: SharedStoreSpec, ok: bool) -> None:
        with self._inflight_lock:
            self._results[spec.key] = [int(ok), int(not ok)]

    def take_results(self) -> dict[bytes, list[int]]:
        """Stores ended since the last call: key -> [1, 0] stored (or already held), [0, 1] not."""
        with self._inflight_lock:
            results, self._results = self._results, {}
        return results

    # ---- loads ---------------------------------------------------------------------------

    def load(self, spec: SharedLoadSpec) -> Future[int]:
        """Load a request's chunks into its blocks; the future fails if the load did."""
        return self._loader.submit(self._load, spec)

    def _load(self, spec: SharedLoadSpec) -> int:
        try:
            staging = self._retrieve(spec)
            with self._streams.copies():  # the kernels read the pinned staging in place
                scatter_blocks(self.cache, list(spec.block_ids), staging)
        except Exception as exc:
            self._count("shared_load_failures", 1)
            self._failed(f"load of request {spec.request_id}", exc)
            logger.warning(
                "LLMDConnector shared tier: load of %d tokens for request %s failed (%s); "
                "reported to vLLM as a failed load (recomputed with "
                "kv_load_failure_policy=recompute)",
                spec.num_tokens,
                spec.request_id,
                exc,
            )
            raise
        self._count("shared_loaded_tokens", spec.num_tokens)
        self._count("shared_loaded_chunks", (spec.end - spec.start) // self.layout.chunk_tokens)
        return spec.num_tokens

    def _retrieve(self, spec: SharedLoadSpec) -> torch.Tensor:
        """Copy the loaded blocks out of the server's slots; the slots are released after."""
        layout = self.layout
        key = self._key(spec.request_id, spec.token_ids, spec.start, spec.end, spec.cache_salt)
        pool = self._current_pool()
        answer = self.client.call("prepare_retrieve", key, self.instance_id)
        if not answer.success:
            raise SharedTierError("the server no longer holds the chunks")
        try:
            slots = answer.context.get("slots") or []
            num_chunks = (spec.end - spec.start) // layout.chunk_tokens
            if len(slots) != num_chunks:
                raise SharedTierError(f"{len(slots)} slots for {num_chunks} chunks")
            staging = self._staging(len(spec.block_ids))
            written = 0
            for index, slot in enumerate(slots):
                first = spec.skip_blocks if index == 0 else 0
                count = layout.blocks_per_chunk - first
                if index == 0 and spec.skip_blocks >= layout.blocks_per_chunk:
                    raise SharedTierError("skip_blocks covers a whole chunk")
                part = staging[
                    written * layout.block_bytes : (written + count) * layout.block_bytes
                ]
                layout.from_chunk(self._slot(pool, slot), part, first)
                written += count
        finally:
            # The slots are copied out: release them without waiting for the answer (a round
            # trip off the load's latency). A lost release costs nothing but the server's
            # read-lock TTL.
            try:
                self.client.submit("commit_retrieve", key, self.instance_id)
            except SharedTierError as exc:
                logger.warning("LLMDConnector shared tier: commit_retrieve failed: %s", exc)
        return staging

    def shutdown(self) -> None:
        self._copier.shutdown(wait=True, cancel_futures=True)
        self._rpc.shutdown(wait=False, cancel_futures=True)
        self._loader.shutdown(wait=False, cancel_futures=True)
        if self.client.is_up:
            try:
                self.client.call(
                    "unregister_kv_cache_engine_driven_context", self.instance_id, timeout_s=2
                )
            except SharedTierError:
                pass
        self.client.close()
