"""Scheduler half of offloading: turns vLLM's hooks into OffloadManager calls and step plans.

- `hit` (from get_num_new_matched_tokens): how many tokens past the local device hit the tiers
  hold. A run held only on disk is first promoted to host memory; until it is, the answer is
  None ("ask again next step"), and a file that fails validation on the way becomes a miss.
- `plan_load` (from update_state_after_alloc): pins the hit chunks for a host → device load.
- `plan_stores` (from build_connector_meta): newly computed full blocks of every scheduled
  request (prompt blocks by default) go to the host tier.
- `on_worker_output`: completions the workers reported; a chunk completes once every worker
  (TP rank) reported it, and fails if any did.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm_llmd.connector.config import LLMDConnectorConfig
from vllm_llmd.connector.metadata import OffloadLoadSpec, OffloadStepSpec
from vllm_llmd.connector.tier_events import chunk_info
from vllm_llmd.log import get_logger
from vllm_llmd.offload.disk_store import DiskChunkStore
from vllm_llmd.offload.manager import OffloadManager, TierEvent
from vllm_llmd.offload.paths import disk_tier_folder
from vllm_llmd.transfer.messages import KVLayoutFingerprint

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = get_logger(__name__)

Key = bytes


class OffloadPlanner:
    """Per-request offload bookkeeping of the scheduler half."""

    def __init__(
        self,
        manager: OffloadManager,
        block_size: int,
        num_workers: int,
        store_decode: bool,
        describe_chunks: bool = True,
    ) -> None:
        self.manager = manager
        # keep each chunk's tokens and parent (ChunkInfo): needed by KV events and disk files
        self.describe_chunks = describe_chunks
        self.block_size = block_size
        self.num_workers = num_workers
        self.store_decode = store_decode
        # live requests whose computed blocks may be stored, and how far they were offered
        self._requests: dict[str, Request] = {}
        self._offered_blocks: dict[str, int] = {}
        # requests loading from the host tier -> the keys they pinned
        self._loading: dict[str, list[Key]] = {}
        # (kind, key) -> [succeeded, failed] reports summed over workers, until all reported
        self._reports: dict[tuple[str, Key], list[int]] = {}
        # this step's store jobs: (key, device block id, host slot)
        self._stores: list[tuple[Key, int, int]] = []
        self._loads: list[OffloadLoadSpec] = []

    # ---- loads ---------------------------------------------------------------------------

    def hit(self, request: Request, num_computed_tokens: int) -> int | None:
        """Tokens after num_computed_tokens (block-aligned) the tiers hold, or None: ask again."""
        self._requests[request.request_id] = request
        start = num_computed_tokens // self.block_size
        keys = list(request.block_hashes[start:])
        in_host, anywhere = self.manager.lookup(keys)
        if anywhere > in_host:
            if self.manager.is_promoting(keys[in_host]):
                return None
            if self.manager.prepare_promote(keys[in_host:anywhere]) > 0:
                return None
        return in_host * self.block_size

    def plan_load(self, request: Request, first_block: int, block_ids: list[int]) -> None:
        """Load len(block_ids) chunks, from the request's block first_block, into block_ids."""
        keys = list(request.block_hashes[first_block : first_block + len(block_ids)])
        slots = self.manager.prepare_load(keys)
        self._loading[request.request_id] = keys
        self._loads.append(OffloadLoadSpec(request.request_id, tuple(block_ids), tuple(slots)))

    def on_load_finished(self, request_ids: set[str]) -> None:
        for request_id in request_ids & self._loading.keys():
            self.manager.complete_load(self._loading.pop(request_id))

    # ---- stores --------------------------------------------------------------------------

    def plan_stores(self, scheduler_output: SchedulerOutput) -> None:
        block_state = scheduler_output.kv_connector_block_state
        if block_state is None:
            return
        for request_id, num_scheduled in scheduler_output.num_scheduled_tokens.items():
            request = self._requests.get(request_id)
            if request is None:
                continue
            computed = request.num_computed_tokens + num_scheduled
            if not self.store_decode:
                computed = min(computed, request.num_prompt_tokens)
            num_full = min(computed // self.block_size, len(request.block_hashes))
            offered = self._offered_blocks.get(request_id, 0)
            if num_full <= offered:
                continue
            (block_ids, *_) = block_state.get_block_ids(request_id) or ([],)
            keys = list(request.block_hashes[offered:num_full])
            block_of = dict(zip(keys, block_ids[offered:num_full], strict=False))
            infos = None
            if self.describe_chunks:
                infos = [chunk_info(request, i, self.block_size) for i in range(offered, num_full)]
            for key, slot in self.manager.prepare_store(keys, infos):
                self._stores.append((key, block_of[key], slot))
            self._offered_blocks[request_id] = num_full

    # ---- every step ----------------------------------------------------------------------

    def take_step(self) -> tuple[list[OffloadLoadSpec], OffloadStepSpec]:
        """This step's loads and tier work for the workers."""
        plan = self.manager.take_plan()
        step = OffloadStepSpec(
            spills=tuple(plan.spills),
            promotes=tuple(plan.promotes),
            stores=tuple(self._stores),
            deletes=tuple(plan.deletes),
        )
        loads, self._loads, self._stores = self._loads, [], []
        return loads, step

    def on_worker_output(self, results: dict[str, dict[Key, list[int]]]) -> None:
        complete = {
            "store": self.manager.complete_store,
            "spill": self.manager.complete_spill,
            "promote": self.manager.complete_promote,
        }
        for kind, per_key in results.items():
            for key, (succeeded, failed) in per_key.items():
                counts = self._reports.setdefault((kind, key), [0, 0])
                counts[0] += succeeded
                counts[1] += failed
                if sum(counts) >= self.num_workers:
                    del self._reports[(kind, key)]
                    complete[kind]([key], counts[1] == 0)

    def request_finished(self, request: Request) -> None:
        self._requests.pop(request.request_id, None)
        self._offered_blocks.pop(request.request_id, None)

    def take_events(self) -> list[TierEvent]:
        return self.manager.take_events()

    def reset(self) -> None:
        """Drop every chunk no copy is using (vLLM's prefix-cache reset)."""
        self.manager.reset()

    def tier_state(self) -> dict[str, list[str]]:
        """Hex keys held per tier (for the debug state file)."""
        return {
            "host": sorted(k.hex() for k in self.manager.host_keys()),
            "disk": sorted(k.hex() for k in self.manager.disk_keys()),
        }


def make_offload_planner(
    config: LLMDConnectorConfig, fingerprint: KVLayoutFingerprint, publish_events: bool
) -> OffloadPlanner | None:
    """The scheduler half's planner, with the disk tier's index rebuilt from its folder."""
    if not config.offload_enabled:
        return None
    num_workers = fingerprint.tensor_parallel_size
    chunk_bytes = fingerprint.num_layers * fingerprint.page_bytes
    host_slots, disk_chunks = config.offload_chunks(chunk_bytes, num_workers)
    manager = OffloadManager(host_slots, disk_chunks, config.offload_policy)
    if disk_chunks:
        folder = disk_tier_folder(config.disk_offload_path, fingerprint)
        scans = [
            DiskChunkStore(folder, fingerprint, rank, chunk_bytes).scan()
            for rank in range(num_workers)
        ]
        # A chunk is usable only if every worker's part of it survived.
        complete = set.intersection(*({c.key for c in scan} for scan in scans))
        found = [(c.key, c.info) for c in scans[0] if c.key in complete][-disk_chunks:]
        manager.add_disk_chunks(found)
        if found:
            logger.info("LLMDConnector offload: %d chunks found on disk in %s", len(found), folder)
    return OffloadPlanner(
        manager,
        fingerprint.block_size,
        num_workers,
        config.offload_decode_blocks,
        describe_chunks=publish_events or disk_chunks > 0,
    )
