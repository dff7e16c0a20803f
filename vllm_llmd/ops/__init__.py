"""Block copies between paged KV caches and contiguous buffers: one entry point, two paths.

- `PagedKVCache.from_layers(kv_caches)` (paged_cache.py): where each block of each layer
  lives, built once from the dict vLLM hands register_kv_caches; also the input checks.
- `gather_blocks(cache, block_ids, out)` / `scatter_blocks(cache, block_ids, src)`
  (block_copy.py): all layers' blocks into / out of one contiguous buffer, in the order
  [block id][layer][bytes of that block of that layer], and the choice of path;
  `copy_blocks(src, src_ids, dst, dst_ids)`: page to page between two caches of one layout.
- cuda_copy.py: the kernels of kernels/copy_pages.cu (compiled by nvrtc.py at first use).
- torch_copy.py: the same copies with index_select / index_copy_ (CPU, or no kernels).
- copy_stream.py: `CopyStreams`, a CUDA stream per copying thread, ordered after vLLM's forward
  by an event (the tiers' stores and loads).
"""

from vllm_llmd.ops.block_copy import (
    COPY_MODE_ENV,
    CopyMode,
    copy_blocks,
    gather_blocks,
    resolve_mode,
    scatter_blocks,
)
from vllm_llmd.ops.paged_cache import PagedKVCache

__all__ = [
    "COPY_MODE_ENV",
    "CopyMode",
    "PagedKVCache",
    "copy_blocks",
    "gather_blocks",
    "resolve_mode",
    "scatter_blocks",
]
