"""LLMDConnector: vLLM's KV-connector API, split like vLLM's own connectors.

- `connector.py`: the facade vLLM instantiates, once per role; it only delegates (and builds
  the scheduler half's tiers from the config).
- `scheduler.py`: the scheduler half (engine-core process): decides what to load, store, send.
- `request_state.py`: `RequestState`, all the scheduler half holds for one request, and its
  `LoadPhase`.
- `tier.py`: `TierPlanner`, the protocol every tier's scheduler side implements (offload:
  `vllm_llmd/offload/planner.py`, shared: `vllm_llmd/shared_tier/planner.py`, remote prefill:
  `remote_prefill.py`).
- `remote_prefill.py`: the decode side of P/D (pulls and releases) as the last tier.
- `worker.py`: the worker half (each worker process): moves bytes, reports completions;
  `worker_tiers.py` builds its tier workers and counts their reports.
- `metadata.py`: the typed step metadata the scheduler half sends the worker half, and the
  workers' answer.
- `tier_events.py`: our tiers' changes as vLLM KV events; `curve_publisher.py`: vLLM's
  KV-event publisher with CURVE, when the environment asks (installed by the plugin);
  `stats.py`: the counters; `config.py`: the typed config; `fingerprint.py`: the KV layout
  fingerprint.
"""
