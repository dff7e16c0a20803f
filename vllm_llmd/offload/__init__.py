"""KV offload tiers below the device cache: host memory, then disk.

The unit is one vLLM block of all layers of one worker, keyed by its block hash
(`vllm_llmd.hashing.BlockHash`): a slot of the host pool holds one, a disk file holds one.
("Chunk" is the shared tier's word: an LMCache chunk of many tokens, `vllm_llmd.shared_tier`.)

- `policy`: `CachePolicy`, the replaceable eviction order of a tier's keys; `make_policy(name)`.
- `disk_store`: `DiskBlockStore`, the disk tier's bytes: one validated safetensors file per
  block, atomic writes, a by-name `list_blocks` to rebuild the index on a warm restart (and a
  header-reading `scan`).
- `disk_scan`: those walks (and the header reader `disk_store` reads with): fast over 100k
  files, and no file or folder content makes them raise.
- `disk_check`: `StartupHeaderCheck`, the headers of the files a start found, read in the
  background (their blocks' tokens for KV events; invalid files out of the index).
- `manager`: scheduler side, the index of what is where and the plan of each step (no bytes).
- `records`: the plain records that index speaks in (entries, step plans, tier events).
- `planner`: scheduler side, the offload tiers' `TierPlanner`: vLLM's hooks turned into manager
  calls and step jobs.
- `jobs`: the typed step jobs (`OffloadStepSpec`); workers report them in a
  `vllm_llmd.job_tally.JobTally`, as every tier does.
- `block_info`: `BlockInfo`, what a block holds (tokens, parent), for its file and its events.
- `worker`: worker side, the host pool, the disk store and the threads that move the bytes.
"""
