"""Tools to run vllm-llmd on one box: a local model maker and a vLLM server process handle.

Tests, the demo and the benchmarks all use these, so there is one way to make a model and one
way to start a server. `worker_harness` drives the connector's worker half without vLLM (the
GPU checks), on the few names `vllm_stand_in` supplies where vLLM is absent.
"""
