"""LLMDConnector loads in a real `vllm serve`, selected by name through the plugin entry point."""

from __future__ import annotations

import psutil
import pytest

from vllm_llmd.devtools.client import complete, completion_token_ids
from vllm_llmd.devtools.model_maker import sample_text
from vllm_llmd.devtools.server import VLLMServerConfig

pytestmark = pytest.mark.server

CONNECTOR = {"kv_connector": "LLMDConnector", "kv_role": "kv_both"}
# Short, one block and a bit, and long (several blocks of the CPU default 128 tokens).
PROMPTS = [sample_text(n, seed=n) for n in (3, 120, 1500)]


@pytest.fixture(scope="session")
def tiny_connector_server(vllm_servers, tiny_model):
    return vllm_servers.shared(
        "tiny-llmd", VLLMServerConfig(model=tiny_model, kv_transfer_config=CONNECTOR)
    )


def test_connector_is_loaded_by_name_and_worker_half_runs(tiny_connector_server):
    server = tiny_connector_server
    answer = complete(server.url, server.model_name, PROMPTS[1], max_tokens=8)
    assert len(completion_token_ids(answer)) == 8

    log = server.log_text()
    # Selected by registry name: no kv_connector_module_path was given.
    assert "kv_connector_module_path=None" in log
    assert "Creating v1 connector with name: LLMDConnector" in log
    # The worker half saw register_kv_caches (logged from the worker process).
    registered = [line for line in log.splitlines() if "LLMDConnector worker registered" in line]
    assert len(registered) == 1, registered
    assert "(Worker" in registered[0] and "2 layers" in registered[0]


def test_greedy_output_is_identical_across_server_starts(
    tiny_connector_server, vllm_servers, tiny_model
):
    first = [
        completion_token_ids(
            complete(tiny_connector_server.url, tiny_connector_server.model_name, p, max_tokens=24)
        )
        for p in PROMPTS
    ]
    # this one with every process on core 0 (whole_server_on_cores), as the benchmarks' pods
    second_server = vllm_servers.launch(
        VLLMServerConfig(
            model=tiny_model, kv_transfer_config=CONNECTOR, whole_server_on_cores=True
        ),
        "tiny-llmd-restart",
    )
    try:
        assert second_server.process is not None
        launcher = psutil.Process(second_server.process.pid)
        tree = [launcher, *launcher.children(recursive=True)]
        # the API server, the engine core and the worker at least, each only on core 0
        assert len(tree) >= 3, tree
        assert {p.pid: p.cpu_affinity() for p in tree} == {p.pid: [0] for p in tree}
        second = [
            completion_token_ids(
                complete(second_server.url, second_server.model_name, p, max_tokens=24)
            )
            for p in PROMPTS
        ]
    finally:
        second_server.stop()
    assert first == second
    # Distinct prompts give distinct continuations: the comparison is not vacuous.
    assert len({tuple(tokens) for tokens in first}) == len(PROMPTS)
