"""KV offload tiers below the device cache: host memory, then disk.

A chunk is one vLLM block (all layers of one worker), keyed by vLLM's block hash (`bytes`).

- `policy`: `CachePolicy`, the replaceable eviction order of a tier's keys; `make_policy(name)`.
- `disk_store`: `DiskChunkStore`, the disk tier's bytes: one validated safetensors file per
  chunk, atomic writes, a header-only `scan` to rebuild the index on a warm restart.
- `manager`: scheduler side, the index of what is where and the plan of each step (no bytes).
- `worker`: worker side, the host pool, the disk store and the threads that move the bytes.
"""
