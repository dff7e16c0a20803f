"""Prefill→decode with the side channel's TLS on, between two "hosts", on real vLLM CPU servers
(tiny model, float32; issue 22).

The decode runs in an IPC namespace of its own (`unshare --ipc`), so its host id differs from
the prefill's and every pull crosses the side channel's TCP socket: a mutual TLS handshake,
then the KV in sealed records. Greedy output must equal a plain vLLM's token for token, the
decode's metrics must show the prompt came by the pull, and the prefill's blocks must return
to its free pool. A decode of the same deployment without the certificates is refused by the
prefill and recomputes, with the same output.
"""

from __future__ import annotations

import pytest
from test_pd import (
    BLOCK,
    _connector,
    _connector_counter,
    _decode,
    _prefill,
    _prompt_ids,
    _reference,
    _wait_for_free_pool,
)
from tokenizers import Tokenizer

from vllm_llmd.devtools.certs import issue_certificate
from vllm_llmd.devtools.server import VLLMServerConfig

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return Tokenizer.from_file(str(tiny_model / "tokenizer.json"))


LEASE_S = 6.0


@pytest.fixture(scope="module")
def sealed_pd(vllm_servers, tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pd-pki")
    issue_certificate(folder, "peer", issue_certificate(folder, "ca", None))
    tls = {
        "side_channel_tls_cert": str(folder / "peer.crt"),
        "side_channel_tls_key": str(folder / "peer.key"),
        "side_channel_tls_ca": str(folder / "ca.crt"),
    }
    timeouts = {"transfer_timeout_s": 5.0, "unknown_transfer_grace_s": 1.0}
    configs = {
        "prefill": VLLMServerConfig(
            model=tiny_model,
            cpu_cores="0",
            kv_transfer_config=_connector("kv_producer", lease_s=LEASE_S, **tls),
        ),
        "decode": VLLMServerConfig(
            model=tiny_model,
            cpu_cores="1",
            kv_transfer_config=_connector("kv_consumer", **timeouts, **tls),
            own_ipc_namespace=True,
        ),
        # the same deployment's decode without the certificates (its pulls are refused)
        "decode-without-tls": VLLMServerConfig(
            model=tiny_model,
            cpu_cores="1",
            kv_transfer_config=_connector("kv_consumer", **timeouts),
            own_ipc_namespace=True,
        ),
        "reference": VLLMServerConfig(model=tiny_model, cpu_cores="1"),
    }
    servers = vllm_servers.shared_group({f"sealed-{name}": c for name, c in configs.items()})
    return {name: servers[f"sealed-{name}"] for name in configs}


def _pd(servers, decode: str, prompt: list[int]) -> list[int]:
    """Prefill on servers["prefill"], then decode on servers[decode]."""
    return _decode({"decode": servers[decode]}, prompt, _prefill(servers, prompt))


@pytest.mark.parametrize("num_tokens", [300, 3000])
def test_a_sealed_pd_output_equals_single_instance(sealed_pd, tokenizer, num_tokens):
    decode = sealed_pd["decode"]
    prompt = _prompt_ids(tokenizer, num_tokens, seed=500 + num_tokens)
    before = _connector_counter(decode, "pd_pulled_tokens")
    assert _pd(sealed_pd, "decode", prompt) == _reference(sealed_pd, prompt)
    # every full block came through the sealed socket (no shared memory across namespaces)
    pulled = _connector_counter(decode, "pd_pulled_tokens") - before
    assert pulled >= (num_tokens // BLOCK) * BLOCK > 0
    # the release came back over the sealed channel too: freed now, not at lease expiry
    _wait_for_free_pool(sealed_pd["prefill"], timeout=LEASE_S / 2)


def test_a_decode_without_the_certificates_is_refused_and_recomputes(sealed_pd, tokenizer):
    decode = sealed_pd["decode-without-tls"]
    prompt = _prompt_ids(tokenizer, 3 * BLOCK + 20, seed=77)
    before = _connector_counter(decode, "pd_pulled_tokens")
    assert _pd(sealed_pd, "decode-without-tls", prompt) == _reference(sealed_pd, prompt)
    assert _connector_counter(decode, "pd_pulled_tokens") == before  # nothing pulled
    assert _connector_counter(decode, "pd_pulls_failed") >= 1
    # its release is refused as well: the prefill frees the blocks when their lease ends
    _wait_for_free_pool(sealed_pd["prefill"], timeout=2 * LEASE_S)
