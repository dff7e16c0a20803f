"""What one block holds (`BlockInfo`): its tokens and its parent's hash, as JSON text.

The offload planner describes each block it stores with it; the text is written into the
block's disk file and carried by its tier events, so a consumer can check the block's hash and
blocks found after a restart are announced completely.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from vllm.v1.request import Request


class BlockInfo(msgspec.Struct, frozen=True, omit_defaults=True):
    """What one block holds: enough for a consumer to check its hash."""

    # hex digest of the previous block's hash; None for a prefix's first block
    parent: str | None
    token_ids: list[int]
    lora_name: str | None = None


def block_info(request: Request, block_index: int, block_size: int) -> str:
    """The BlockInfo text of a request's block_index-th block."""
    parent = request.block_hashes[block_index - 1].hex() if block_index else None
    start = block_index * block_size
    lora = request.lora_request.name if request.lora_request else None
    tokens = list(request.all_token_ids[start : start + block_size])
    return msgspec.json.encode(BlockInfo(parent, tokens, lora)).decode()
