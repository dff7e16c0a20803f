"""The endpoint picker before two real vLLM pods (tiny model, KV events on): after a pod's
KV events say it holds a prompt's prefix, the picker names that pod for a request on the same
prefix, from the same block index the proxy routes with (the pods were sent their prompts
directly, so only their events can have told the router)."""

from __future__ import annotations

import time

import grpc
import pytest
from envoy.service.ext_proc.v3.external_processor_pb2_grpc import ExternalProcessorStub
from router_harness import router_args
from test_router_epp import _body, _destination, _endpoint, _headers
from tokenizers import Tokenizer

from vllm_llmd.devtools.client import complete, metric_sum, scrape_metrics
from vllm_llmd.devtools.model_maker import sample_text
from vllm_llmd.devtools.server import free_port

pytestmark = pytest.mark.server

BLOCK = 128


def test_the_picker_names_the_pod_whose_events_hold_the_prefix(
    router_pods, tiny_model, start_router
):
    tokenizer = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    epp_port = free_port()
    args = router_args(*(pod.url for pod in router_pods), policy="kv_aware", tokenizer=tiny_model)
    router = start_router([*args, "--epp-port", str(epp_port)], "router-epp")
    model = router_pods[0].model_name
    prefixes = []
    for i, pod in enumerate(router_pods):  # each pod alone computes its own prefix
        prefix = tokenizer.encode(sample_text(5 * BLOCK, seed=2100 + i)).ids[: 4 * BLOCK]
        complete(pod.url, model, [*prefix, 11, 12], max_tokens=1)
        prefixes.append(prefix)
    time.sleep(1.5)  # their BlockStored events reach the router's index
    with grpc.insecure_channel(f"127.0.0.1:{epp_port}") as channel:
        stub = ExternalProcessorStub(channel)
        for pod, prefix in zip(router_pods, prefixes, strict=True):
            body = f'{{"model": "{model}", "prompt": {[*prefix, 21, 22]}, "max_tokens": 1}}'
            answers = stub.Process(iter([_headers(), _body(body.encode(), True)]), timeout=30)
            _, routed = list(answers)
            assert _destination(routed)[1] == _endpoint(pod.url)
    metrics = scrape_metrics(router.url)
    assert metric_sum(metrics, "llmd:router_decisions_total", kind="direct") == 2
    assert metric_sum(metrics, "llmd:router_request_prefix_hit_tokens_sum") >= 2 * 4 * BLOCK
