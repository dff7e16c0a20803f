"""The shared KV tier: prompt KV shared across instances and hosts through LMCache MP servers.

Each vLLM instance talks to one `lmcache server` on its own host (shared memory); the servers
share a lower tier (Redis through `--l2-adapter`), so a prefix one instance computed is loaded,
not recomputed, by any other. LMCache is an optional extra (`pip install 'vllm-llmd[lmcache]'`),
imported only when `shared_tier_url` is set.

- `client`: `SharedTierClient`, one connection to one server: lazy import of LMCache's own client,
  every call bounded by a timeout, a health state with a heartbeat that brings it back.
- `layout`: `ChunkLayout`, LMCache's chunk object for a vLLM CPU cache and the permuted copies
  between it and a staging buffer that `vllm_llmd.ops` fills.
- `messages`: what the scheduler half tells the worker half to load and store each step.
- `lookup`: `SharedLookup`, one request's lookup on the server (kept in its `RequestState`).
- `planner`: scheduler side, per request: async lookup → hit tokens, lock release, session end,
  and the chunks to store.
- `worker`: worker side: registers the KV layout, stores and loads chunks through the server's
  shared-memory slots, off the engine step.
- `lmcache_server`: `LMCacheServer`, a real `lmcache server` child process: a dev helper for
  the tests and `benchmarks/bench_shared_tier.py`, not used by the connector.
"""
