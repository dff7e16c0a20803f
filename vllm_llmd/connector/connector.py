"""LLMDConnector: the class vLLM instantiates, once per role. A thin facade.

vLLM builds one instance with role SCHEDULER in the engine core and one with role WORKER in
each worker process. This class picks the matching half and forwards each hook to it; the two
halves share nothing but `LLMDConnectorMetadata`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    KVConnectorWorkerMetadata,
)

from vllm_llmd.compat import check_vllm_version
from vllm_llmd.connector.config import LLMDConnectorConfig
from vllm_llmd.connector.fingerprint import kv_layout_fingerprint
from vllm_llmd.connector.metadata import LLMDConnectorMetadata, LLMDHandshake
from vllm_llmd.connector.scheduler import LLMDConnectorScheduler
from vllm_llmd.connector.stats import LLMDConnectorStats, LLMDPromMetrics
from vllm_llmd.connector.worker import LLMDConnectorWorker
from vllm_llmd.log import get_logger
from vllm_llmd.offload.disk_check import StartupHeaderCheck
from vllm_llmd.offload.disk_store import DiskBlockStore
from vllm_llmd.offload.manager import OffloadManager
from vllm_llmd.offload.paths import disk_tier_folder
from vllm_llmd.offload.planner import OffloadPlanner

if TYPE_CHECKING:
    from vllm.config import KVTransferConfig, VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

    from vllm_llmd.kv_layout import KVLayoutFingerprint
    from vllm_llmd.shared_tier.planner import SharedTierPlanner

logger = get_logger(__name__)


class LLMDConnector(KVConnectorBase_V1):
    """P/D KV transfer and KV offload tiers in one vLLM connector."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ) -> None:
        check_vllm_version()
        super().__init__(vllm_config, role, kv_cache_config)
        transfer_config = self._kv_transfer_config
        self.config = LLMDConnectorConfig.from_extra_config(
            transfer_config.kv_connector_extra_config
        )
        fingerprint = kv_layout_fingerprint(vllm_config, kv_cache_config)
        model_name, world_size = shared_tier_identity(vllm_config, self.config)
        self._scheduler: LLMDConnectorScheduler | None = None
        self._worker: LLMDConnectorWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = LLMDConnectorScheduler(
                self.config,
                engine_id=str(transfer_config.engine_id),
                fingerprint=fingerprint,
                is_producer=transfer_config.is_kv_producer,
                is_consumer=transfer_config.is_kv_consumer,
                offload=make_offload_planner(
                    self.config, fingerprint, kv_events_enabled(vllm_config)
                ),
                publish_events=kv_events_enabled(vllm_config),
                shared=make_shared_planner(
                    self.config, transfer_config, model_name, world_size, fingerprint.block_size
                ),
            )
        elif role == KVConnectorRole.WORKER:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self._worker = LLMDConnectorWorker(
                self.config,
                fingerprint,
                tp_rank=get_tensor_model_parallel_rank(),
                is_producer=transfer_config.is_kv_producer,
                model_name=model_name,
                world_size=world_size,
            )

    @property
    def scheduler(self) -> LLMDConnectorScheduler:
        assert self._scheduler is not None, "scheduler hook called on a worker-role connector"
        return self._scheduler

    @property
    def worker(self) -> LLMDConnectorWorker:
        assert self._worker is not None, "worker hook called on a scheduler-role connector"
        return self._worker

    # ---- worker side -----------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, LLMDConnectorMetadata)
        self.worker.start_load_kv(metadata)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        return None

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        assert isinstance(kv_connector_metadata, LLMDConnectorMetadata)
        self.worker.handle_preemptions(kv_connector_metadata)

    def wait_for_save(self) -> None:
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, LLMDConnectorMetadata)
        self.worker.wait_for_save(metadata)

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        return self.worker.build_worker_metadata()

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        return self.worker.get_handshake_metadata()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        results = self.get_transfer_results(finished_req_ids)
        return results.finished_sending or None, results.finished_recving or None

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        sending, recving, failed = self.worker.get_finished(finished_req_ids)
        # vLLM wants a failed receive in finished_recving too.
        return KVConnectorTransferResults(
            finished_sending=sending, finished_recving=recving, failed_recving=failed
        )

    def get_kv_connector_stats(self) -> LLMDConnectorStats | None:
        if self._worker is None:  # the scheduler half: its tiers' occupancy
            return self._scheduler.take_stats() if self._scheduler is not None else None
        stats = self._worker.take_stats()
        return None if stats.is_empty() else stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> LLMDConnectorStats:
        return LLMDConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> LLMDPromMetrics:
        return LLMDPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None and self._scheduler.offload is not None:
            self._scheduler.offload.close()
        if self._scheduler is not None and self._scheduler.shared is not None:
            self._scheduler.shared.close()

    # vLLM 0.33 sleep-mode hooks; 0.32 never calls them. We touch KV only through the torch
    # tensors vLLM gave us, so there is nothing to unregister or restore.
    def unregister_kv_caches(self) -> None:
        return None

    def restore_kv_caches(self) -> None:
        return None

    # ---- scheduler side --------------------------------------------------------------------

    def set_xfer_handshake_metadata(
        self, metadata: dict[int, KVConnectorHandshakeMetadata]
    ) -> None:
        # vLLM 0.33 calls this again after a wake-up; it is a plain overwrite.
        handshakes = {rank: m for rank, m in metadata.items() if isinstance(m, LLMDHandshake)}
        self.scheduler.set_worker_handshakes(handshakes)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self.scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self.scheduler.update_connector_output(connector_output)

    def take_events(self) -> Iterable[KVCacheEvent]:
        return self.scheduler.take_events()

    def reset_cache(self) -> bool | None:
        return self.scheduler.reset_cache() if self._scheduler is not None else None

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request, block_ids)

    @property
    def requires_kv_delivery(self) -> bool:
        # Only a P/D producer hands KV off at finish; offloading is a best-effort cache.
        return self._kv_transfer_config.is_kv_producer


def kv_events_enabled(vllm_config: VllmConfig) -> bool:
    """Whether vLLM publishes KV events: only then do we build any (else they cost nothing)."""
    events_config = vllm_config.kv_events_config
    return bool(events_config is not None and events_config.enable_kv_cache_events)


def shared_tier_identity(vllm_config: VllmConfig, config: LLMDConnectorConfig) -> tuple[str, int]:
    """(model name, world size) that key this instance's chunks on the LMCache server.

    The model is vLLM's --model as given, as LMCacheMPConnector keys it: instances share chunks
    only if they name the model alike (and share dtype, block size and chunk size).
    """
    parallel = vllm_config.parallel_config
    if config.shared_tier_url and parallel.pipeline_parallel_size > 1:
        raise ValueError("LLMDConnector: the shared tier does not support pipeline parallelism")
    return str(vllm_config.model_config.model), parallel.tensor_parallel_size


def make_shared_planner(
    config: LLMDConnectorConfig,
    transfer_config: KVTransferConfig,
    model_name: str,
    world_size: int,
    block_size: int,
) -> SharedTierPlanner | None:
    """The scheduler half's shared tier (None when shared_tier_url is unset).

    Raises ImportError naming the extra when LMCache is not installed, and ValueError when the
    chunk size is not a multiple of the block size: both at start-up.
    """
    if not config.shared_tier_url:
        return None
    from vllm_llmd.shared_tier.client import SharedTierClient
    from vllm_llmd.shared_tier.planner import SharedTierPlanner

    if config.shared_tier_chunk_tokens % block_size:
        raise ValueError(
            f"LLMDConnector: shared_tier_chunk_tokens {config.shared_tier_chunk_tokens} is not "
            f"a multiple of the block size {block_size}"
        )
    if getattr(transfer_config, "kv_load_failure_policy", "recompute") != "recompute":
        logger.warning(
            "LLMDConnector: shared tier on, but kv_load_failure_policy is %r: a load the "
            "LMCache server fails (it went down mid-load) fails its request; set it to "
            "'recompute' to recompute instead",
            transfer_config.kv_load_failure_policy,
        )
    client = SharedTierClient(
        config.shared_tier_url,
        config.shared_tier_timeout_s,
        config.shared_tier_retry_s,
        chunk_tokens=config.shared_tier_chunk_tokens,
        name="scheduler",
    )
    return SharedTierPlanner(
        client,
        model_name,
        world_size,
        block_size,
        config.shared_tier_chunk_tokens,
        store=config.shared_tier_store,
    )


def make_offload_planner(
    config: LLMDConnectorConfig, fingerprint: KVLayoutFingerprint, publish_events: bool
) -> OffloadPlanner | None:
    """The scheduler half's planner, with the disk tier's index rebuilt from its folder."""
    if not config.offload_enabled:
        return None
    num_workers = fingerprint.tensor_parallel_size
    block_bytes = fingerprint.num_layers * fingerprint.page_bytes
    host_slots, disk_blocks, staging_slots = config.offload_capacity(block_bytes, num_workers)
    manager = OffloadManager(host_slots, disk_blocks, config.offload_policy, staging_slots)
    header_check: StartupHeaderCheck | None = None
    if disk_blocks:
        folder = disk_tier_folder(config.disk_offload_path, fingerprint)
        stores = [
            DiskBlockStore(folder, fingerprint, rank, block_bytes) for rank in range(num_workers)
        ]
        # By name only: reading 100k headers on a cold disk would hold the start for seconds.
        listings = [store.list_blocks() for store in stores]
        # A block is usable only if every worker's part of it survived.
        complete = set.intersection(*({c.key for c in listing} for listing in listings))
        found = [c.key for c in listings[0] if c.key in complete][-disk_blocks:]
        manager.add_disk_blocks((key, "") for key in found)
        if found:
            logger.info("LLMDConnector offload: %d blocks found on disk in %s", len(found), folder)
            header_check = StartupHeaderCheck(stores, found)
    return OffloadPlanner(
        manager,
        fingerprint.block_size,
        num_workers,
        config.offload_decode_blocks,
        describe_blocks=publish_events or disk_blocks > 0,
        header_check=header_check,
    )
