"""A cluster-scale simulator that runs the router's real policy and index code against
simulated vLLM pods (`vllm-llmd-sim`; see docs/simulator.md).

    workloads.py  requests as vLLM block hashes: llm-d shared prefixes, chat, Mooncake traces
    profile.py    a step's latency (fitted by calibrate.py against a real server)
    cache.py      a pod's prefix cache: LRU, host tier, KV events
    pod.py        a pod's engine: continuous batching, chunked prefill
    router.py     the router's index, ingest path and decide_route, in-process
    run.py        one simulation on SimPy, and sweeps over policies and pod counts
    metrics.py    percentiles, goodput, hit rate, imbalance; plots.py the PNG
"""
