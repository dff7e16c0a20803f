"""Typed messages between the connector's halves.

The scheduler half builds one `LLMDConnectorMetadata` per engine step; vLLM ships it to every
worker inside `SchedulerOutput`, and the worker half executes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass
class LLMDConnectorMetadata(KVConnectorMetadata):
    """What the worker half must do in one engine step (nothing yet)."""

    def is_empty(self) -> bool:
        return True
