"""The router's P/D two-step with vLLM's own NixlConnector pods (UCX over host memory on this
CPU box): the router needs nothing of ours on the pods. A long prompt runs on the prefill pod,
its KV moves by NIXL to the decode pod (vLLM's external-transfer metric says so), and the
answer equals the prefill pod's own greedy answer."""

from __future__ import annotations

import importlib.util

import pytest
from router_harness import read_audit, router_args
from tokenizers import Tokenizer

from vllm_llmd.devtools.client import complete, completion_token_ids, metric_sum, scrape_metrics
from vllm_llmd.devtools.model_maker import sample_text
from vllm_llmd.devtools.server import VLLMServerConfig, free_port

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(importlib.util.find_spec("nixl") is None, reason="nixl is not installed"),
]


def _nixl_pod(model, role: str, cores: str) -> VLLMServerConfig:
    return VLLMServerConfig(
        model=model,
        cpu_cores=cores,
        env={
            "UCX_TLS": "tcp,self,sm,cma",
            "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
            "VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port()),
        },
        kv_transfer_config={
            "kv_connector": "NixlConnector",
            "kv_role": role,
            "kv_buffer_device": "cpu",
        },
    )


@pytest.fixture(scope="module")
def nixl_pods(vllm_servers, tiny_model):
    servers = vllm_servers.shared_group(
        {
            "nixl-prefill": _nixl_pod(tiny_model, "kv_producer", "0"),
            "nixl-decode": _nixl_pod(tiny_model, "kv_consumer", "1"),
        }
    )
    return servers["nixl-prefill"], servers["nixl-decode"]


def _external_tokens(server) -> float:
    return metric_sum(
        scrape_metrics(server.url),
        "vllm:prompt_tokens_by_source_total",
        source="external_kv_transfer",
    )


def test_router_runs_nixl_prefill_then_decode(nixl_pods, tiny_model, start_router, tmp_path):
    prefill, decode = nixl_pods
    audit = tmp_path / "audit.jsonl"
    args = router_args(
        f"{prefill.url},role=prefill",
        f"{decode.url},role=decode",
        tokenizer=tiny_model,
        pd_threshold_tokens=100,
        audit_log=audit,
    )
    router = start_router(args, "router-nixl")
    tokenizer = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    prompt = tokenizer.encode(sample_text(1200, seed=881)).ids[:1000]
    before = _external_tokens(decode)
    answer = complete(router.url, decode.model_name, prompt, max_tokens=8)
    [record] = read_audit(audit)
    assert (record["prefill_pod"], record["decode_pod"]) == (prefill.url, decode.url)
    # NIXL moves whole blocks: 7 of the 1000 tokens' 128-token blocks; the rest is computed.
    assert _external_tokens(decode) - before >= 7 * 128
    reference = complete(prefill.url, prefill.model_name, prompt, max_tokens=8)
    assert completion_token_ids(answer) == completion_token_ids(reference)
