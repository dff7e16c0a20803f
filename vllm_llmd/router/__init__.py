"""vllm-llmd-router: a KV-cache-aware, load-aware, disaggregation-aware OpenAI proxy.

Split as llm-d's kv-cache manager is: per-pod event subscribers feed one `Index` (which pod holds
which block in which tier); a `TokenProcessor` turns a request into vLLM block hashes; a scorer
ranks pods by cached prefix and load; the proxy forwards (and runs the prefill -> decode
two-step).
"""
