"""Prefill→decode between instances of unequal TP sizes on real vLLM CPU servers (issue 25).

Three servers, one thread per TP rank, unpinned (`nobind`): A (TP 1, kv_both), B (TP 2,
kv_both) and a plain TP-1 vLLM as the reference. The tiny model has 2 KV heads: each of
B's workers holds one. A→B: each B worker reads its head's slice of A's one worker (which
frees the blocks at the second release). B→A: A's worker reads B's two workers one after
another and puts each slice in its heads' place. Greedy output through the pulled KV must
equal the reference token for token, and the decode's metrics must show the prompt came by
transfer.

Unpinned, because pinning stalled them: with A on core 0, B's ranks on cores 0 and 1 and the
reference on core 1, two instances share each core, and a vLLM instance busy-loops while it
holds a transfer (it steps until the blocks are released). Measured with py-spy and logs: a
B rank took the step message with its pull 45-60 s late, exactly until A (same core) stopped
stepping at its lease expiry; another time A's worker answered nothing for 41 s. Unpinned,
the kernel moves them apart, and stalls are rarer but not gone: while B held a transfer,
A's API server once left /metrics unanswered for 30 s, and on a fresh CI machine A
recomputed a 700-token prompt instead of pulling it (its log was not kept; a pull stalled
past the 60 s transfer timeout fits). Hence the long timeouts, and the decode's counters read
before the prefill rather than while the prefill steps holding its transfer.

Warm-up first: a TP-2 vLLM compiles the masked lookup of its vocabulary-parallel embedding
(torch.compile, inductor's C++ build) at its first forward, and again when a second shape
makes it dynamic; on two cores that takes tens of seconds, paid here before any pull.
"""

from __future__ import annotations

import pytest
from test_pd import (
    BLOCK,
    MAX_TOKENS,
    _connector_counter,
    _delta,
    _prompt_ids,
    _tokens_by_source,
    _wait_for_free_pool,
)
from tokenizers import Tokenizer

from vllm_llmd.devtools.client import complete, completion_token_ids
from vllm_llmd.devtools.server import VLLMServerConfig

pytestmark = pytest.mark.server

# Generous for a loaded 2-core box (a fresh CI machine recomputed a pull at 60 s); blocks
# freed well before the lease still prove every prefill worker was released.
LEASE_S = 300.0
TRANSFER_TIMEOUT_S = 150.0
FREED_WITHIN_S = 30.0
# two prompt lengths (not a multiple of the block size): a static compile, then the dynamic one
WARM_UP_LENGTHS = (5, 300)


def _both_roles() -> dict:
    return {
        "kv_connector": "LLMDConnector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "lease_s": LEASE_S,
            "transfer_timeout_s": TRANSFER_TIMEOUT_S,
            "unknown_transfer_grace_s": TRANSFER_TIMEOUT_S,
        },
    }


@pytest.fixture(scope="module")
def instances(vllm_servers, tiny_model, tokenizer):
    configs = {
        "tp1": VLLMServerConfig(
            model=tiny_model, cpu_cores="nobind", kv_transfer_config=_both_roles()
        ),
        "tp2": VLLMServerConfig(
            model=tiny_model,
            cpu_cores="nobind",  # one thread per TP rank, as the others; the OS places them
            kv_transfer_config=_both_roles(),
            extra_args=["--tensor-parallel-size", "2"],
        ),
        "reference": VLLMServerConfig(model=tiny_model, cpu_cores="nobind"),
    }
    servers = vllm_servers.shared_group({f"hetero-{name}": c for name, c in configs.items()})
    named = {name: servers[f"hetero-{name}"] for name in configs}
    for length in WARM_UP_LENGTHS:  # see the module doc: compiles before any pull
        prompt = _prompt_ids(tokenizer, length, seed=7 + length)
        for server in named.values():
            complete(server.url, server.model_name, prompt, max_tokens=2)
    return named


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return Tokenizer.from_file(str(tiny_model / "tokenizer.json"))


def _prefill(server, prompt) -> dict:
    answer = complete(
        server.url,
        server.model_name,
        prompt,
        max_tokens=1,
        kv_transfer_params={"do_remote_decode": True},
    )
    params = answer["kv_transfer_params"]
    assert params and params["do_remote_prefill"] and params["llmd_transfer_id"], answer
    return params


def _generate(server, prompt, params: dict | None = None) -> list[int]:
    extra = {} if params is None else {"kv_transfer_params": params}
    return completion_token_ids(
        complete(server.url, server.model_name, prompt, max_tokens=MAX_TOKENS, **extra)
    )


@pytest.mark.parametrize(("prefill", "decode"), [("tp1", "tp2"), ("tp2", "tp1")])
@pytest.mark.parametrize("num_tokens", [7, 2 * BLOCK, 700])
def test_unequal_tp_output_equals_single_instance(
    instances, tokenizer, prefill, decode, num_tokens
):
    # a prompt of its own per direction: neither instance has it cached
    seed = 1000 + num_tokens + (500 if prefill == "tp2" else 0)
    prompt = _prompt_ids(tokenizer, num_tokens, seed=seed)
    # read before the prefill, not while it holds the transfer (module doc)
    before = _tokens_by_source(instances[decode])
    pulled_before = _connector_counter(instances[decode], "pd_pulled_tokens")
    params = _prefill(instances[prefill], prompt)
    assert params["tp_size"] == (2 if prefill == "tp2" else 1)

    assert _generate(instances[decode], prompt, params) == _generate(instances["reference"], prompt)

    moved = _delta(_tokens_by_source(instances[decode]), before)
    # The whole prompt came by transfer: the decode computed none of it.
    assert moved == {"local_compute": 0, "local_cache_hit": 0, "external_kv_transfer": num_tokens}
    # every decode worker counts the tokens it pulled its heads of
    pulled = _connector_counter(instances[decode], "pd_pulled_tokens") - pulled_before
    assert pulled >= num_tokens
    # every prefill worker was released (A's by both of B's, each of B's by A's): no lease wait
    _wait_for_free_pool(instances[prefill], timeout=FREED_WITHIN_S)
