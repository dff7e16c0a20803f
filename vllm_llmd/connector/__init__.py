"""LLMDConnector: vLLM's KV-connector API, split like vLLM's own connectors.

- `connector.py`: the facade vLLM instantiates, once per role; it only delegates.
- `scheduler.py`: the scheduler half (engine-core process): decides what to load, store, send.
- `worker.py`: the worker half (each worker process): moves bytes, reports completions.
- `metadata.py`: the typed step metadata the scheduler half sends the worker half.
"""
