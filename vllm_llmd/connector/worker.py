"""Worker half of LLMDConnector: runs in each worker process, owns the bytes.

Hooks vLLM calls on this half: `register_kv_caches` once after the KV cache is allocated, then
per step `start_load_kv` → (`wait_for_layer_load`, `save_kv_layer` per attention layer) →
`wait_for_save` → `get_transfer_results`. It never decides anything; it executes the step
metadata and reports completions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_llmd.connector.metadata import LLMDConnectorMetadata
from vllm_llmd.log import get_logger

logger = get_logger(__name__)


@dataclass(frozen=True)
class KVCacheRegistration:
    """What the worker learned about the KV cache vLLM gave it."""

    # layer name -> that layer's cache tensor (views over one shared storage)
    layer_names: tuple[str, ...]
    # number of KV blocks per layer
    num_blocks: int
    # bytes of one block of one layer
    page_size_bytes: int
    dtype: torch.dtype
    device: torch.device


class LLMDConnectorWorker:
    """Executes the scheduler half's plan on the KV cache tensors."""

    def __init__(self) -> None:
        self.kv_caches: dict[str, torch.Tensor] = {}
        self.registration: KVCacheRegistration | None = None

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> KVCacheRegistration:
        first = next(iter(kv_caches.values()))
        self.kv_caches = dict(kv_caches)
        self.registration = KVCacheRegistration(
            layer_names=tuple(kv_caches),
            num_blocks=first.shape[0],
            page_size_bytes=first[0].numel() * first.element_size(),
            dtype=first.dtype,
            device=first.device,
        )
        # Tests and operators read this line to know the worker half is live.
        logger.info(
            "LLMDConnector worker registered KV caches: %d layers, %d blocks, "
            "%d bytes per block per layer, %s on %s",
            len(kv_caches),
            self.registration.num_blocks,
            self.registration.page_size_bytes,
            self.registration.dtype,
            self.registration.device,
        )
        return self.registration

    def start_load_kv(self, metadata: LLMDConnectorMetadata) -> None:
        return None

    def wait_for_save(self) -> None:
        return None

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        return set(), set()
