"""Worker half of LLMDConnector: runs in each worker process, owns the bytes.

Hooks vLLM calls on this half: `register_kv_caches` once after the KV cache is allocated
(then `get_handshake_metadata`), and per step `start_load_kv` → `wait_for_save` →
`get_transfer_results`. It never decides anything: it executes the step metadata and reports
completions.

P/D: a prefill worker runs a `TransferServer` over a `SendRegistry` of held transfers and
reports a request in `finished_sending` once its transfer was released or its lease expired. A
decode worker pulls on a thread pool and reports `finished_recving` (plus `failed_recving`
when the pull failed, so vLLM recomputes or fails the request per kv_load_failure_policy).

Offload: an `OffloadWorker` runs each step's tier plan after the forward (`wait_for_save`) on
a thread of its own, behind the steps; only a step whose plan says so (a request with stores in
flight ended or was preempted) waits for them before its forward (`handle_preemptions`). It
loads host slots and disk files into a request's blocks on other threads; a request's load
(tiers and pull alike) finishes when all its parts did.

Shared tier: a `SharedTierWorker` (vllm_llmd/shared_tier/worker.py) gathers the step's new prompt
chunks after the forward and sends them to the LMCache server off the step; the next step waits
only for the gather. Its loads are one more part of a request's load.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch

from vllm_llmd.connector.config import LLMDConnectorConfig
from vllm_llmd.connector.kv_pull import KVPuller, release_endpoints
from vllm_llmd.connector.metadata import (
    LLMDConnectorMetadata,
    LLMDHandshake,
    LLMDWorkerMetadata,
    OffloadLoadSpec,
    RecvSpec,
    ReleaseSpec,
)
from vllm_llmd.connector.stats import LLMDConnectorStats
from vllm_llmd.connector.worker_tiers import (
    count_offload_results,
    make_offload_worker,
    make_shared_worker,
    shared_store_tally,
)
from vllm_llmd.job_tally import JobTally
from vllm_llmd.kv_layout import KVLayoutFingerprint
from vllm_llmd.log import get_logger
from vllm_llmd.offload.worker import OffloadWorker
from vllm_llmd.ops import PagedKVCache, gather_blocks
from vllm_llmd.ops.copy_stream import CopyStreams
from vllm_llmd.transfer.client import release_transfer
from vllm_llmd.transfer.cuda_ipc import CudaIpcWriter, IpcUnavailable, export_cache
from vllm_llmd.transfer.head_slices import HeadSlicer, HeadSliceUnsupported
from vllm_llmd.transfer.messages import CudaIpcCache
from vllm_llmd.transfer.registry import SendOutcome, SendRegistry
from vllm_llmd.transfer.server import TransferServer

if TYPE_CHECKING:
    from vllm_llmd.shared_tier.messages import SharedLoadSpec
    from vllm_llmd.shared_tier.worker import SharedTierWorker

logger = get_logger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class KVCacheRegistration:
    """What the worker learned about the KV cache vLLM gave it."""

    layer_names: tuple[str, ...]
    num_blocks: int
    # bytes of one block of one layer
    page_size_bytes: int
    dtype: torch.dtype
    device: torch.device


class LLMDConnectorWorker:
    """Executes the scheduler half's plan on the KV cache tensors."""

    def __init__(
        self,
        config: LLMDConnectorConfig,
        fingerprint: KVLayoutFingerprint,
        tp_rank: int,
        is_producer: bool,
        model_name: str = "",
        world_size: int = 1,
    ) -> None:
        self.config = config
        # the shared tier's key: vLLM's --model as given (what LMCacheMPConnector uses too)
        self.model_name = model_name or fingerprint.model
        self.world_size = world_size
        self.fingerprint = fingerprint
        self.tp_rank = tp_rank
        self.is_producer = is_producer
        self.registration: KVCacheRegistration | None = None
        self.kv_cache: PagedKVCache | None = None
        # decode side: pulls recvs (made with the KV cache)
        self.puller: KVPuller | None = None
        # counter increments since the last get_kv_connector_stats (pull threads add too)
        self._stats = LLMDConnectorStats()
        # set whenever a load of this worker ends: an idle step waits on it (get_finished)
        self._progress = threading.Event()
        self.registry = SendRegistry(config.lease_s)
        self._idle_step = False  # this step computes nothing (its metadata says)
        self._reported_held = 0  # pd_held_blocks as last reported
        self.server: TransferServer | None = None
        # decode side, CUDA: our cache's IPC description, sent with each same-host pull
        self._ipc_cache: CudaIpcCache | None = None
        # prefill side, CUDA: writes into same-host peers' caches (holds their mappings)
        self._ipc_writer: CudaIpcWriter | None = None
        self._pool = ThreadPoolExecutor(config.num_transfer_threads, "llmd-pull")
        self.offload: OffloadWorker | None = None
        self.shared: SharedTierWorker | None = None
        self._copy_streams: CopyStreams | None = None  # made with the KV cache
        # request id -> the futures of its load (pull and/or host-tier copy)
        self._loads: dict[str, list[Future]] = {}
        # request ids vLLM has reported finished: a send may be reported only after that
        self._finished_requests: set[str] = set()
        self._held_requests: set[str] = set()
        # sends whose blocks may be freed, until vLLM has reported their request finished
        self._pending_frees: set[str] = set()
        self._lock = threading.Lock()

    # ---- start-up ------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> KVCacheRegistration:
        self.kv_cache = PagedKVCache.from_layers(kv_caches)
        # prefill side, CUDA: a read's gather on a stream of the side channel's own, so it
        # never waits behind the forward vLLM is running (held blocks were computed before)
        self._copy_streams = CopyStreams(self.kv_cache.device)
        first = next(iter(kv_caches.values()))
        self.registration = KVCacheRegistration(
            layer_names=tuple(kv_caches),
            num_blocks=self.kv_cache.num_blocks,
            page_size_bytes=self.kv_cache.page_bytes,
            dtype=first.dtype,
            device=first.device,
        )
        expected = self.fingerprint.num_layers * self.fingerprint.page_bytes
        if self.kv_cache.block_bytes != expected:
            raise RuntimeError(
                f"LLMDConnector: a block of all layers holds {self.kv_cache.block_bytes} bytes, "
                f"the KV cache spec says {expected}"
            )
        if self.config.offload_enabled:
            self.offload = make_offload_worker(
                self.config, self.fingerprint, self.kv_cache, self.tp_rank
            )
        if self.config.shared_tier_url:
            self.shared = make_shared_worker(
                self.config,
                kv_caches,
                self.kv_cache,
                self.model_name,
                self.world_size,
                self.tp_rank,
                self._count,
            )
        use_ipc = self.config.cuda_ipc and self.kv_cache.device.type == "cuda"
        if use_ipc:
            try:
                self._ipc_cache = export_cache(self.kv_cache)
            except IpcUnavailable as exc:
                logger.info("LLMDConnector: no same-host CUDA IPC pulls: %s", exc)
        head_slicer = self._head_slicer(self.kv_cache)
        self.puller = KVPuller(
            self.config, self.fingerprint, self.tp_rank, self.kv_cache, head_slicer, self._ipc_cache
        )
        if self.is_producer:
            self._ipc_writer = CudaIpcWriter(self.kv_cache) if use_ipc else None
            port = self.config.side_channel_port
            self.server = TransferServer(
                self.config.side_channel_host,
                port + self.tp_rank if port else 0,
                self.registry,
                self._gather,
                self.fingerprint,
                self.kv_cache.block_bytes,
                ipc_write=self._ipc_writer.write if self._ipc_writer else None,
                max_chunk_bytes=self.config.max_chunk_bytes,
                tls=self.config.side_channel_tls(server_side=True),
                head_slicer=head_slicer,
            )
        # Tests and operators read this line to know the worker half is live.
        logger.info(
            "LLMDConnector worker registered KV caches: %d layers, %d blocks, "
            "%d bytes per block per layer, %s on %s; side channel %s",
            len(kv_caches),
            self.registration.num_blocks,
            self.registration.page_size_bytes,
            self.registration.dtype,
            self.registration.device,
            f"{self.server.host}:{self.server.port}" if self.server else "off",
        )
        return self.registration

    def _head_slicer(self, kv_cache: PagedKVCache) -> HeadSlicer | None:
        """Head-sliced reads of this cache (unequal TP sizes), if its layout allows them."""
        try:
            return HeadSlicer(kv_cache, self.fingerprint)
        except HeadSliceUnsupported as exc:
            logger.info("LLMDConnector: no P/D with unequal TP sizes: %s", exc)
            return None

    def get_handshake_metadata(self) -> LLMDHandshake:
        return LLMDHandshake(self.tp_rank, self.server.port if self.server else None)

    # ---- every step ----------------------------------------------------------------------

    def handle_preemptions(self, metadata: LLMDConnectorMetadata) -> None:
        """Start of a step, before its forward: stores still reading device blocks that vLLM
        may now give to another request finish first (offload: only when the scheduler half
        says so; shared tier: its gathers, always)."""
        if self.offload is not None and metadata.offload_step.flush_first:
            self.offload.flush_stores()
        if self.shared is not None:
            self.shared.flush_stores()

    def start_load_kv(self, metadata: LLMDConnectorMetadata) -> None:
        # vLLM does not guard this hook: an exception here kills the engine core. Each job is
        # started on its own; one that cannot start fails its request's load (recompute).
        self._idle_step = metadata.idle_step
        for send in metadata.sends:
            self.registry.add(send.request_id, send.transfer_id, list(send.block_ids))
            self._held_requests.add(send.request_id)
        for load in metadata.offload_loads:
            self._start_load(load.request_id, self._load_offloaded, load)
        for shared_load in metadata.shared_loads:
            self._start_load(shared_load.request_id, self._load_shared, shared_load)
        for recv in metadata.recvs:
            self._track_load(recv.request_id, self._pool.submit(self._pull, recv))
        for release in metadata.releases:
            for endpoint in self._release_endpoints(release):
                self._pool.submit(
                    release_transfer,
                    endpoint,
                    release.transfer_id,
                    release.reason,
                    self.config.transfer_timeout_s,
                    tls=self.config.side_channel_tls(server_side=False),
                )

    def _start_load(self, request_id: str, start: Callable[[T], Future], spec: T) -> None:
        try:
            future = start(spec)
        except Exception as exc:
            logger.exception("LLMDConnector: request %s: load could not start", request_id)
            future = Future()
            future.set_exception(exc)
        self._track_load(request_id, future)

    def _track_load(self, request_id: str, future: Future) -> None:
        """One part of a request's load; its end wakes an idle step's wait."""
        self._loads.setdefault(request_id, []).append(future)
        future.add_done_callback(lambda _: self._progress.set())

    def _load_offloaded(self, load: OffloadLoadSpec) -> Future:
        assert self.offload is not None
        started = time.monotonic()
        future = self.offload.load(load)
        self._count("offload_loaded_chunks", len(load.block_ids))  # disk reads: when reported

        def loaded(done: Future[None]) -> None:
            if done.exception() is None:
                self._observe("offload_load_seconds", time.monotonic() - started)

        future.add_done_callback(loaded)
        return future

    def _load_shared(self, load: SharedLoadSpec) -> Future:
        assert self.shared is not None
        return self.shared.load(load)

    def _release_endpoints(self, release: ReleaseSpec) -> list[str]:
        return release_endpoints(release, self.tp_rank, self.fingerprint.tensor_parallel_size)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str], set[str]]:
        """(finished_sending, finished_recving, failed_recving) request ids of this step.

        A step that computed nothing, with nothing to report and loads still running (pulls,
        tier loads), first waits up to idle_wait_ms for one of them to end: vLLM would
        otherwise step again at once, over and over, its threads taking the core and the GIL
        from the very threads that move the KV. A prefill worker holding blocks for pulls does
        not wait for their releases: measured, waking its engine on a release delayed the
        release's answer over TLS (benchmarks/README.md, "Idle steps")."""
        self._progress.clear()  # ends from here on wake the wait below
        finished = self._collect_finished(finished_req_ids)
        if (
            self._idle_step
            and self.config.idle_wait_ms > 0
            and not any(finished)
            and self._loads
            and self._progress.wait(self.config.idle_wait_ms / 1000)
        ):
            finished = self._collect_finished(set())
        return finished

    def _collect_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str], set[str]]:
        self._finished_requests |= finished_req_ids & self._held_requests
        for send in self.registry.take_finished():
            if send.outcome == SendOutcome.DONE:
                self._count("sends_released")
            elif send.outcome == SendOutcome.EXPIRED:
                self._count("sends_expired")
                logger.warning(
                    "LLMDConnector: transfer for request %s expired after %.0fs unread; "
                    "its blocks are freed",
                    send.request_id,
                    self.config.lease_s,
                )
            else:
                self._count("sends_failed")
            self._pending_frees.add(send.request_id)
        sending = self._pending_frees & self._finished_requests
        self._pending_frees -= sending
        self._finished_requests -= sending
        self._held_requests -= sending

        recving, failed = set(), set()
        for request_id, futures in list(self._loads.items()):
            if not all(future.done() for future in futures):
                continue
            del self._loads[request_id]
            recving.add(request_id)
            if any(future.exception() is not None for future in futures):
                failed.add(request_id)
        return sending, recving, failed

    def wait_for_save(self, metadata: LLMDConnectorMetadata) -> None:
        """After the forward: this step's full blocks may be copied out now."""
        if self.shared is not None:
            self.shared.submit_stores(metadata.shared_stores)
        if self.offload is not None:
            self.offload.submit_step(metadata.offload_step)
            if self.tp_rank == 0:  # counted once per instance
                self._count("offload_dropped_chunks", metadata.offload_step.num_dropped)

    def build_worker_metadata(self) -> LLMDWorkerMetadata | None:
        results = JobTally()
        if self.shared is not None:
            results.merge(shared_store_tally(self.shared.take_results()))
        if self.offload is not None:
            offload_results = self.offload.take_results()
            count_offload_results(offload_results, self._count)
            results.merge(offload_results)
        return None if results.is_empty() else LLMDWorkerMetadata(results)

    # ---- bytes ---------------------------------------------------------------------------

    def _gather(self, block_ids: list[int], out: torch.Tensor | None = None) -> torch.Tensor:
        """Blocks of every layer into `out` (a same-host shared-memory segment) or a new host
        staging buffer (pinned on CUDA)."""
        cache = self.kv_cache
        assert cache is not None
        on_cuda = cache.device.type == "cuda"
        staging = out
        if staging is None:
            staging = torch.empty(
                cache.buffer_bytes(len(block_ids)), dtype=torch.uint8, pin_memory=on_cuda
            )
        assert self._copy_streams is not None
        with self._copy_streams.copies():  # done when this returns: the staging is sent next
            gather_blocks(cache, block_ids, staging)
        return staging

    def _pull(self, recv: RecvSpec) -> int:
        assert self.puller is not None
        started = time.monotonic()
        try:
            received = self.puller.pull(recv)
        except Exception as exc:
            self._count("pulls_failed")
            logger.error(
                "LLMDConnector: pull of request %s from %s failed: %s",
                recv.request_id,
                recv.host,
                exc,
            )
            raise
        self._count("pulls_done")
        self._count("pulled_bytes", received)
        self._count("pulled_tokens", recv.num_tokens)
        self._observe("pd_pull_seconds", time.monotonic() - started)
        return received

    def _count(self, key: str, amount: int = 1) -> None:
        with self._lock:
            self._stats.add(key, amount)

    def _observe(self, key: str, seconds: float) -> None:
        with self._lock:
            self._stats.observe(key, seconds)

    def take_stats(self) -> LLMDConnectorStats:
        """Counter increments since the last call, and the held-blocks gauge when it moved."""
        held = self.registry.num_blocks_held() if self.is_producer else 0
        with self._lock:
            stats, self._stats = self._stats, LLMDConnectorStats()
        if held != self._reported_held:
            self._reported_held = held
            stats.set("pd_held_blocks", held)
        return stats

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.close()
        if self._ipc_writer is not None:  # after the server: no write is running now
            self._ipc_writer.close()
        if self.offload is not None:
            self.offload.shutdown()
        if self.shared is not None:
            self.shared.shutdown()
        self._pool.shutdown(wait=False, cancel_futures=True)
