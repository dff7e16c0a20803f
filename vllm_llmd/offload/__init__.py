"""KV offload tiers below the device cache: host memory, then disk.

A chunk is one vLLM block (all layers of one worker), keyed by vLLM's block hash (`bytes`).

- `policy`: `CachePolicy`, the replaceable eviction order of a tier's keys; `make_policy(name)`.
- `disk_store`: `DiskChunkStore`, the disk tier's bytes: one validated safetensors file per
  chunk, atomic writes, a header-only `scan` to rebuild the index on a warm restart.
- `manager`: scheduler side, the index of what is where and the plan of each step (no bytes).
- `planner`: scheduler side, the offload tiers' `TierPlanner`: vLLM's hooks turned into manager
  calls and step jobs.
- `jobs`: the typed step jobs (`OffloadStepSpec`) and the completion tally (`JobTally`) every
  tier reports with.
- `chunk_info`: `ChunkInfo`, what a chunk holds (tokens, parent), for its file and its events.
- `worker`: worker side, the host pool, the disk store and the threads that move the bytes.
"""
