"""Scheduler half of LLMDConnector: runs in the engine-core process, owns "what is where".

Hooks vLLM calls on this half, in order, for each request:
`get_num_new_matched_tokens` → `update_state_after_alloc` → `build_connector_meta` (every step)
→ `update_connector_output` (every step with worker output) → `request_finished` (once).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm_llmd.connector.metadata import LLMDConnectorMetadata

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request


class LLMDConnectorScheduler:
    """Plans loads, stores and transfers for each step. It holds no tensors."""

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return 0, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        return None

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> LLMDConnectorMetadata:
        return LLMDConnectorMetadata()

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        return False, None
