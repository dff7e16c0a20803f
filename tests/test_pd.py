"""Prefill→decode through LLMDConnector on real vLLM CPU servers (tiny model, float32).

Three servers, each on one core: a prefill (kv_producer), a decode (kv_consumer, recompute on
load failure) and a plain vLLM as the reference. Greedy output of prefill→decode must equal the
reference token for token; the decode's metrics must show the prompt came by transfer; the
prefill's blocks must return to its free pool on every exit path.
"""

from __future__ import annotations

import json
import secrets
import time

import pytest
from tokenizers import Tokenizer

from vllm_llmd.devtools.client import (
    HTTPStatusError,
    complete,
    completion_token_ids,
    metric_sum,
    post_json,
    scrape_metrics,
    timed_stream,
)
from vllm_llmd.devtools.model_maker import sample_text
from vllm_llmd.devtools.server import VLLMServerConfig, free_port

pytestmark = pytest.mark.server

BLOCK = 128  # vLLM's default block size on CPU
LEASE_S = 6.0
MAX_TOKENS = 16


def _connector(role: str, **extra) -> dict:
    config = {"kv_connector": "LLMDConnector", "kv_role": role}
    if role == "kv_consumer":
        config["kv_load_failure_policy"] = "recompute"
    if extra:
        config["kv_connector_extra_config"] = extra
    return config


@pytest.fixture(scope="module")
def pd(vllm_servers, tiny_model):
    # Start all three before waiting on any: start-up is mostly I/O and Python imports.
    configs = {
        "prefill": VLLMServerConfig(
            model=tiny_model,
            cpu_cores="0",
            kv_transfer_config=_connector("kv_producer", lease_s=LEASE_S),
        ),
        "decode": VLLMServerConfig(
            model=tiny_model,
            cpu_cores="1",
            kv_transfer_config=_connector(
                "kv_consumer", transfer_timeout_s=5.0, unknown_transfer_grace_s=1.0
            ),
        ),
        "reference": VLLMServerConfig(model=tiny_model, cpu_cores="1"),
    }
    servers = vllm_servers.shared_group({f"pd-{name}": c for name, c in configs.items()})
    return {name: servers[f"pd-{name}"] for name in configs}


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return Tokenizer.from_file(str(tiny_model / "tokenizer.json"))


def _prompt_ids(tokenizer, num_tokens: int, seed: int) -> list[int]:
    ids = tokenizer.encode(sample_text(num_tokens, seed=seed)).ids
    assert len(ids) >= num_tokens
    return ids[:num_tokens]


def _prefill(pd, prompt) -> dict:
    answer = complete(
        pd["prefill"].url,
        pd["prefill"].model_name,
        prompt,
        max_tokens=1,
        kv_transfer_params={"do_remote_decode": True},
    )
    params = answer["kv_transfer_params"]
    assert params and params["do_remote_prefill"] and params["llmd_transfer_id"], answer
    return params


def _decode(pd, prompt, params) -> list[int]:
    answer = complete(
        pd["decode"].url,
        pd["decode"].model_name,
        prompt,
        max_tokens=MAX_TOKENS,
        kv_transfer_params=params,
    )
    return completion_token_ids(answer)


def _reference(pd, prompt) -> list[int]:
    return completion_token_ids(
        complete(pd["reference"].url, pd["reference"].model_name, prompt, max_tokens=MAX_TOKENS)
    )


def _tokens_by_source(server) -> dict[str, float]:
    samples = scrape_metrics(server.url)
    return {
        source: metric_sum(samples, "vllm:prompt_tokens_by_source_total", source=source)
        for source in ("local_compute", "local_cache_hit", "external_kv_transfer")
    }


def _delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def _connector_counter(server, key: str) -> float:
    """One of LLMDConnector's own counters, from the server's /metrics."""
    return metric_sum(scrape_metrics(server.url), f"llmd:{key}_total")


def _kv_usage(server) -> float:
    return metric_sum(scrape_metrics(server.url), "vllm:kv_cache_usage_perc")


def _wait_until(condition, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


def _wait_for_free_pool(server, timeout: float) -> float:
    """Seconds until the server holds no KV blocks (fails the test after timeout)."""
    start = time.monotonic()
    while _kv_usage(server) > 0:
        assert time.monotonic() - start < timeout, f"blocks still held after {timeout}s"
        time.sleep(0.2)
    return time.monotonic() - start


@pytest.mark.parametrize("num_tokens", [7, BLOCK, 2 * BLOCK, 300, 3000])
def test_pd_output_equals_single_instance(pd, tokenizer, num_tokens):
    prompt = _prompt_ids(tokenizer, num_tokens, seed=num_tokens)
    before = _tokens_by_source(pd["decode"])
    params = _prefill(pd, prompt)
    assert params["remote_num_tokens"] == num_tokens
    assert len(params["remote_block_ids"]) == -(-num_tokens // BLOCK)

    assert _decode(pd, prompt, params) == _reference(pd, prompt)

    moved = _delta(_tokens_by_source(pd["decode"]), before)
    # The whole prompt came by transfer: the decode computed none of it.
    assert moved == {"local_compute": 0, "local_cache_hit": 0, "external_kv_transfer": num_tokens}
    assert _connector_counter(pd["decode"], "pd_pulled_tokens") >= num_tokens
    _wait_for_free_pool(pd["prefill"], timeout=LEASE_S / 2)


def test_decode_does_not_refetch_what_its_prefix_cache_holds(pd, tokenizer):
    prompt = _prompt_ids(tokenizer, 5 * BLOCK + 40, seed=11)
    _decode(pd, prompt, _prefill(pd, prompt))  # now in the decode's prefix cache

    before = _tokens_by_source(pd["decode"])
    assert _decode(pd, prompt, _prefill(pd, prompt)) == _reference(pd, prompt)
    moved = _delta(_tokens_by_source(pd["decode"]), before)
    # Only the part after the last full cached block is pulled again.
    assert moved["local_cache_hit"] == 5 * BLOCK
    assert moved["external_kv_transfer"] == 40
    assert moved["local_compute"] == 0
    _wait_for_free_pool(pd["prefill"], timeout=LEASE_S / 2)


def test_wrong_transfer_id_recomputes_and_lease_frees_the_prefill(pd, tokenizer):
    prompt = _prompt_ids(tokenizer, 900, seed=21)
    params = dict(_prefill(pd, prompt), llmd_transfer_id=secrets.token_urlsafe(24))
    before = _tokens_by_source(pd["decode"])

    started = time.monotonic()
    assert _decode(pd, prompt, params) == _reference(pd, prompt)
    assert time.monotonic() - started < 15  # bounded: grace 1s, no hang

    moved = _delta(_tokens_by_source(pd["decode"]), before)
    assert moved["external_kv_transfer"] == 0 and moved["local_compute"] == 900
    # Nobody released the real transfer: its lease frees the blocks.
    assert _kv_usage(pd["prefill"]) > 0
    expired_before = _connector_counter(pd["prefill"], "pd_sends_expired")
    waited = _wait_for_free_pool(pd["prefill"], timeout=LEASE_S + 5)
    assert waited > 0.5
    assert "expired after" in pd["prefill"].log_text()
    assert _connector_counter(pd["prefill"], "pd_sends_expired") == expired_before + 1
    assert _connector_counter(pd["decode"], "pd_pulls_failed") >= 1


def test_unreachable_prefill_recomputes_without_hanging(pd, tokenizer):
    prompt = _prompt_ids(tokenizer, 500, seed=31)
    real = _prefill(pd, prompt)
    closed_port = free_port()
    params = dict(real, remote_port=closed_port, llmd_ports=[closed_port])

    expired_before = _connector_counter(pd["prefill"], "pd_sends_expired")
    started = time.monotonic()
    assert _decode(pd, prompt, params) == _reference(pd, prompt)
    assert time.monotonic() - started < 20  # transfer_timeout_s is 5 on the decode
    assert "pull of request" in pd["decode"].log_text()
    _wait_for_free_pool(pd["prefill"], timeout=LEASE_S + 5)  # freed by its lease
    _wait_until(lambda: _connector_counter(pd["prefill"], "pd_sends_expired") > expired_before)


def test_decode_side_rejection_releases_the_prefill_at_once(pd, tokenizer):
    prompt = _prompt_ids(tokenizer, 700, seed=41)
    params = _prefill(pd, prompt)
    assert _kv_usage(pd["prefill"]) > 0
    # The decode's API server rejects this before scheduling; vLLM still runs
    # request_finished for it, and the connector releases the prefill's blocks.
    with pytest.raises(HTTPStatusError) as err:
        complete(
            pd["decode"].url,
            pd["decode"].model_name,
            prompt,
            max_tokens=10**6,
            kv_transfer_params=params,
        )
    assert err.value.status == 400
    waited = _wait_for_free_pool(pd["prefill"], timeout=LEASE_S + 5)
    assert waited < LEASE_S - 1, f"freed only after {waited:.1f}s: by lease, not by release"


CRASH_PARAMS = [
    # the review's reproduction: killed the engine core of any role (IndexError in a worker)
    {"do_remote_prefill": True, "llmd_transfer_id": "x", "remote_host": "h", "llmd_ports": []},
    {"do_remote_prefill": True, "llmd_transfer_id": "x", "remote_host": "h", "llmd_ports": "p"},
    {"do_remote_prefill": True, "llmd_transfer_id": ["x"], "llmd_ports": [1, 2, 3]},
    {"do_remote_prefill": True, "llmd_transfer_id": "x", "llmd_ports": [[1]], "remote_host": 5},
]


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_crafted_params_are_recomputed_and_the_server_keeps_serving(pd, tokenizer, role):
    server = pd[role]
    prompt = _prompt_ids(tokenizer, 300, seed=51)
    for params in CRASH_PARAMS:
        answer = complete(
            server.url, server.model_name, prompt, max_tokens=MAX_TOKENS, kv_transfer_params=params
        )
        assert completion_token_ids(answer) == _reference(pd, prompt), params
    # Still alive and still moving KV: a real P/D round after the crafted ones.
    other = _prompt_ids(tokenizer, 400, seed=52)
    assert _decode(pd, other, _prefill(pd, other)) == _reference(pd, other)
    _wait_for_free_pool(pd["prefill"], timeout=LEASE_S / 2)


@pytest.fixture(scope="module")
def tiered_decode(pd, vllm_servers, tiny_model):
    """A decode instance whose device cache holds 16 blocks, with a host tier below it."""
    config = VLLMServerConfig(
        model=tiny_model,
        cpu_cores="1",
        kv_cache_bytes=16 * 2 * 131072,
        max_model_len=1024,
        kv_transfer_config=_connector("kv_consumer", host_offload_bytes=64 << 20),
    )
    return vllm_servers.shared("pd-decode-tiered", config)


def test_decode_uses_its_own_tiers_before_the_remote_prefill(pd, tiered_decode, tokenizer):
    decode = tiered_decode
    prompt = _prompt_ids(tokenizer, 6 * BLOCK + 40, seed=61)
    first = complete(
        decode.url,
        decode.model_name,
        prompt,
        max_tokens=MAX_TOKENS,
        kv_transfer_params=_prefill(pd, prompt),
    )
    assert completion_token_ids(first) == _reference(pd, prompt)
    # Other traffic evicts the prompt from the decode's 16-block device cache.
    for seed in (62, 63):
        complete(
            decode.url,
            decode.model_name,
            _prompt_ids(tokenizer, 7 * BLOCK, seed=seed),
            max_tokens=1,
        )

    before = {
        key: _connector_counter(decode, key)
        for key in ("offload_loaded_chunks", "pd_pulled_tokens")
    }
    sources_before = _tokens_by_source(decode)
    second = complete(
        decode.url,
        decode.model_name,
        prompt,
        max_tokens=MAX_TOKENS,
        kv_transfer_params=_prefill(pd, prompt),
    )
    assert completion_token_ids(second) == _reference(pd, prompt)
    # The six full blocks came from the decode's own caches (what its device cache lost, from
    # its host tier); only the 40-token tail was pulled from the prefill.
    loaded = _connector_counter(decode, "offload_loaded_chunks") - before["offload_loaded_chunks"]
    device_hit = _delta(_tokens_by_source(decode), sources_before)["local_cache_hit"]
    assert loaded >= 1 and loaded * BLOCK + device_hit == 6 * BLOCK
    assert _connector_counter(decode, "pd_pulled_tokens") - before["pd_pulled_tokens"] == 40
    _wait_for_free_pool(pd["prefill"], timeout=LEASE_S / 2)


@pytest.mark.parametrize("stream", [False, True])
def test_router_runs_prefill_then_decode(pd, tokenizer, tiny_model, start_router, tmp_path, stream):
    audit = tmp_path / "audit.jsonl"
    router = start_router(
        [
            "--pod",
            f"{pd['prefill'].url},role=prefill",
            "--pod",
            f"{pd['decode'].url},role=decode",
            "--tokenizer",
            str(tiny_model),
            "--pd-threshold-tokens",
            "100",
            "--audit-log",
            str(audit),
        ],
        "router-pd",
    )
    prompt = _prompt_ids(tokenizer, 1000, seed=71 + stream)
    before = _tokens_by_source(pd["decode"])
    if stream:
        timing = timed_stream(router.url, pd["decode"].model_name, prompt, max_tokens=MAX_TOKENS)
        reference = complete(
            pd["reference"].url, pd["reference"].model_name, prompt, max_tokens=MAX_TOKENS
        )["choices"][0]["text"]
        assert timing.text == reference
    else:
        answer = complete(router.url, pd["decode"].model_name, prompt, max_tokens=MAX_TOKENS)
        assert completion_token_ids(answer) == _reference(pd, prompt)
    [record] = [json.loads(line) for line in audit.read_text().splitlines()]
    assert record["kind"] == "pd" and record["prefilled"] and record["status"] == 200
    assert record["prefill_pod"] == pd["prefill"].url
    assert record["decode_pod"] == pd["decode"].url
    assert (record["ttft_s"] is not None) == stream
    moved = _delta(_tokens_by_source(pd["decode"]), before)
    assert moved["external_kv_transfer"] == 1000 and moved["local_compute"] == 0
    _wait_for_free_pool(pd["prefill"], timeout=LEASE_S / 2)


def test_sidecar_honours_an_allowlisted_prefill_header_only(
    pd, tokenizer, tiny_model, start_router, tmp_path
):
    """Sidecar mode: the router sits beside one decode pod; an upstream gateway picks the
    prefill pod with llm-d's header. Only allowlisted targets are ever called."""
    audit = tmp_path / "audit.jsonl"
    prefill_host_port = f"127.0.0.1:{pd['prefill'].config.port}"
    router = start_router(
        [
            "--pod",
            f"{pd['decode'].url},role=decode",
            "--tokenizer",
            str(tiny_model),
            "--prefill-allowlist",
            prefill_host_port,
            "--audit-log",
            str(audit),
        ],
        "router-sidecar",
    )
    prompt = _prompt_ids(tokenizer, 600, seed=81)
    body = {
        "model": pd["decode"].model_name,
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }

    before = _tokens_by_source(pd["decode"])
    answer = post_json(
        router.url + "/v1/completions", body, headers={"x-prefiller-host-port": prefill_host_port}
    )
    assert completion_token_ids(answer) == _reference(pd, prompt)
    assert _delta(_tokens_by_source(pd["decode"]), before)["external_kv_transfer"] == 600

    prefill_requests = metric_sum(scrape_metrics(pd["prefill"].url), "vllm:request_success_total")
    for header in (
        {"x-prefiller-host-port": f"127.0.0.1:{free_port()}"},
        {"x-prefiller-url": "http://169.254.169.254"},
    ):
        with pytest.raises(HTTPStatusError) as err:
            post_json(router.url + "/v1/completions", body, headers=header)
        assert err.value.status == 403 and "allowlist" in err.value.body
    # Refused before anything was called: one audit record (the allowed request) in all.
    assert len(audit.read_text().splitlines()) == 1
    assert (
        metric_sum(scrape_metrics(pd["prefill"].url), "vllm:request_success_total")
        == prefill_requests
    )
    _wait_for_free_pool(pd["prefill"], timeout=LEASE_S / 2)
