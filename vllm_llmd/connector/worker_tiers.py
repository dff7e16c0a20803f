"""The worker half's tier workers: how each is built from the config, and what its reports
add to the connector's counters.

`LLMDConnectorWorker` (worker.py) builds them once the KV cache is registered and runs their
jobs each step; this module owns their construction and the counters of their tallies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from vllm_llmd.connector.config import LLMDConnectorConfig
from vllm_llmd.job_tally import JobKind, JobTally
from vllm_llmd.kv_layout import KVLayoutFingerprint
from vllm_llmd.log import get_logger
from vllm_llmd.offload.disk_store import DiskBlockStore
from vllm_llmd.offload.paths import disk_tier_folder
from vllm_llmd.offload.worker import OffloadWorker
from vllm_llmd.ops import PagedKVCache

if TYPE_CHECKING:
    import torch

    from vllm_llmd.shared_tier.worker import SharedTierWorker

logger = get_logger(__name__)

# job kind -> (counter of blocks done or None, counter of blocks failed)
_COUNTERS_OF_KIND = {
    JobKind.STORE: ("offload_stored_chunks", "offload_failed_writes"),
    JobKind.SPILL: ("offload_spilled_chunks", "offload_failed_writes"),
    JobKind.DISK_READ: ("offload_promoted_chunks", "offload_rejected_chunks"),
    JobKind.VERIFY: (None, "offload_rejected_chunks"),
}


def make_offload_worker(
    config: LLMDConnectorConfig,
    fingerprint: KVLayoutFingerprint,
    kv_cache: PagedKVCache,
    tp_rank: int,
) -> OffloadWorker:
    """This worker's host pool and (if configured) its part of the disk tier."""
    num_workers = fingerprint.tensor_parallel_size
    host_slots, disk_blocks, staging_slots = config.offload_capacity(
        kv_cache.block_bytes, num_workers
    )
    disk = None
    if disk_blocks:
        disk = DiskBlockStore(
            disk_tier_folder(config.disk_offload_path, fingerprint),
            fingerprint,
            tp_rank,
            kv_cache.block_bytes,
        )
    logger.info(
        "LLMDConnector offload: host tier %d blocks (%.1f MiB), disk tier %s",
        host_slots,
        host_slots * kv_cache.block_bytes / 2**20,
        f"{disk_blocks} blocks in {disk.root}" if disk else "off",
    )
    return OffloadWorker(
        kv_cache, host_slots, disk, config.offload_disk_threads, num_staging_slots=staging_slots
    )


def make_shared_worker(
    config: LLMDConnectorConfig,
    kv_caches: dict[str, torch.Tensor],
    kv_cache: PagedKVCache,
    model_name: str,
    world_size: int,
    tp_rank: int,
    count: Callable[[str, int], None],
) -> SharedTierWorker:
    """This worker's connection to the shared tier's LMCache server (LMCache imported here)."""
    from vllm_llmd.shared_tier.worker import SharedTierWorker

    return SharedTierWorker(
        config.shared_tier_url,
        kv_caches,
        kv_cache,
        model_name=model_name,
        world_size=world_size,
        worker_id=tp_rank,
        chunk_tokens=config.shared_tier_chunk_tokens,
        timeout_s=config.shared_tier_timeout_s,
        retry_s=config.shared_tier_retry_s,
        max_inflight_chunks=config.shared_tier_max_inflight_chunks,
        count=count,
    )


def count_offload_results(results: JobTally, count: Callable[[str, int], None]) -> None:
    """Add an offload tally to the connector's counters."""
    for kind, (ok_key, failed_key) in _COUNTERS_OF_KIND.items():
        succeeded, failed = results.totals(kind)
        if ok_key is not None:
            count(ok_key, succeeded)
        count(failed_key, failed)


def shared_store_tally(results: dict[bytes, list[int]]) -> JobTally:
    """The shared tier worker's store reports (key -> [succeeded, failed]) as a tally."""
    tally = JobTally()
    for key, (succeeded, failed) in results.items():
        tally.add(JobKind.SHARED_STORE, key, succeeded, failed)
    return tally
