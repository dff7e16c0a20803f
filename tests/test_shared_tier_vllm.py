"""The shared KV tier between real vLLM servers: two vLLM servers with LLMDConnector, each on
its own LMCache MP server, the two servers sharing one Redis ("two hosts"): a prompt served by A
is loaded by B; the router credits both pods from their KV events; B's LMCache server killed and
restarted; interop with vLLM's own LMCacheMPConnector.
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest
from shared_tier_harness import CHUNK, LOG_DIR, lmcache_pair, needs_lmcache

from vllm_llmd.shared_tier.lmcache_server import LMCacheServer

PROMPT_TOKENS = 7 * CHUNK + 100  # 7 whole chunks (1792 tokens) are shared, 100 computed
SHARED_TOKENS = 7 * CHUNK
MAX_TOKENS = 12


def _llmd_config(model: Path, cores: str, lmcache: LMCacheServer):
    from vllm_llmd.devtools.server import VLLMServerConfig, free_port

    return VLLMServerConfig(
        model=model,
        cpu_cores=cores,
        max_model_len=4096,
        kv_transfer_config={
            "kv_connector": "LLMDConnector",
            "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {
                "shared_tier_url": lmcache.url,
                "shared_tier_timeout_s": 3.0,
                "shared_tier_retry_s": 0.5,
            },
        },
        kv_events_config={  # a router follows them (medium SHARED for the shared tier)
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "topic": "kv",
            "endpoint": f"tcp://*:{free_port()}",
            "replay_endpoint": f"tcp://*:{free_port()}",
        },
        env={"LMCACHE_DISABLE_BANNER": "1", "LMCACHE_TRACK_USAGE": "false"},
    )


def _lmcache_mp_config(model: Path, cores: str, lmcache: LMCacheServer):
    """vLLM's own LMCacheMPConnector on the same kind of server (interop)."""
    from vllm_llmd.devtools.server import VLLMServerConfig

    return VLLMServerConfig(
        model=model,
        cpu_cores=cores,
        max_model_len=4096,
        kv_transfer_config={
            "kv_connector": "LMCacheMPConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {
                "lmcache.mp.host": f"tcp://{lmcache.config.host}",
                "lmcache.mp.port": lmcache.config.port,
                "lmcache.mp.mq_timeout": 10,
                "lmcache.mp.heartbeat_interval": 2,
            },
        },
        env={"LMCACHE_DISABLE_BANNER": "1", "LMCACHE_TRACK_USAGE": "false"},
    )


@pytest.fixture(scope="module")
def vllm_lmcache(redis_url):
    """LMCache servers for the vLLM tests ("host A", "host B"), sharing the module's Redis."""
    yield from lmcache_pair(redis_url, name_prefix="v", log_prefix="vllm-")


@pytest.fixture(scope="module")
def instances(vllm_servers, small_model, vllm_lmcache):
    from vllm_llmd.devtools.server import VLLMServerConfig

    return vllm_servers.shared_group(
        {
            "shared-a": _llmd_config(small_model, "0", vllm_lmcache["a"]),
            "shared-b": _llmd_config(small_model, "1", vllm_lmcache["b"]),
            "shared-reference": VLLMServerConfig(model=small_model, cpu_cores="0"),
        }
    )


@pytest.fixture(scope="module")
def prompts(small_model):
    from tokenizers import Tokenizer

    from vllm_llmd.devtools.model_maker import sample_text

    tokenizer = Tokenizer.from_file(str(small_model / "tokenizer.json"))
    return {
        name: tokenizer.encode(sample_text(PROMPT_TOKENS, seed=900 + i)).ids[:PROMPT_TOKENS]
        for i, name in enumerate(
            ("a_to_b", "after_restart", "while_down", "b_to_mp", "mp_to_b", "routed", "b_miss")
        )
    }


def _generate(server, prompt: list[int]) -> list[int]:
    from vllm_llmd.devtools.client import complete, completion_token_ids

    return completion_token_ids(complete(server.url, server.model_name, prompt, MAX_TOKENS))


def _reference(server, prompt: list[int], split: int | None) -> list[int]:
    """Plain vLLM's greedy output, with its own prefix cache holding `split` tokens first."""
    if split:
        _generate(server, prompt[: split + 8])  # caches split // 128 full blocks
    return _generate(server, prompt)


def _snapshot(server) -> dict[str, float]:
    from vllm_llmd.devtools.client import metric_sum, scrape_metrics

    samples = scrape_metrics(server.url)
    snap = {
        src: metric_sum(samples, "vllm:prompt_tokens_by_source_total", source=src)
        for src in ("local_compute", "local_cache_hit", "external_kv_transfer")
    }
    for key in ("loaded_tokens", "load_failures", "stored_chunks", "store_failures"):
        snap[key] = metric_sum(samples, f"llmd:shared_{key}_total")
    return snap


def _poke(server) -> None:
    """A tiny request: steps ship the counters of stores that finished after the last step."""
    from vllm_llmd.devtools.client import complete

    complete(server.url, server.model_name, [11, 12, 13], max_tokens=2)


def _served(server, prompt: list[int]) -> tuple[list[int], dict[str, float], float]:
    before = _snapshot(server)
    start = time.monotonic()
    output = _generate(server, prompt)
    elapsed = time.monotonic() - start
    time.sleep(0.5)  # connector stats ride an engine step's output
    after = _snapshot(server)
    return output, {k: after[k] - before[k] for k in after}, elapsed


def _wait_in_redis(redis_url: str, model: Path, count: int, timeout: float = 30) -> None:
    """LMCache servers write to Redis after the store RPC returned: wait for the chunks."""
    import redis

    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout
    while len(list(client.scan_iter(match=f"{model}@*", count=1000))) < count:
        assert time.monotonic() < deadline, "chunks never reached Redis"
        time.sleep(0.2)
    client.close()


def _wait_log(server, text: str, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while server.log_text().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} x{count} not in log:\n{server.log_tail()}"
        time.sleep(0.2)


@needs_lmcache
@pytest.mark.server
def test_a_computes_b_loads_from_the_shared_tier(instances, prompts, redis_url, small_model):
    a, b, ref = instances["shared-a"], instances["shared-b"], instances["shared-reference"]
    before = _snapshot(a)
    for name in ("a_to_b", "after_restart"):
        output, moved, _ = _served(a, prompts[name])
        assert moved["external_kv_transfer"] == 0, moved
        assert output == _reference(ref, prompts[name], None)
    _wait_in_redis(redis_url, small_model, 14)
    _poke(a)
    assert _snapshot(a)["stored_chunks"] - before["stored_chunks"] == 14

    output, moved, _ = _served(b, prompts["a_to_b"])
    assert moved["loaded_tokens"] == SHARED_TOKENS, moved
    assert moved["external_kv_transfer"] == SHARED_TOKENS, moved  # vLLM agrees
    assert moved["local_compute"] == PROMPT_TOKENS - SHARED_TOKENS
    assert moved["load_failures"] == 0
    assert output == _reference(ref, prompts["a_to_b"], SHARED_TOKENS)


def _router_metric(router, name: str) -> float:
    from vllm_llmd.devtools.client import metric_sum, scrape_metrics

    return metric_sum(scrape_metrics(router.url), name)


@needs_lmcache
@pytest.mark.server
def test_the_router_counts_the_shared_tier_on_every_pod(instances, prompts, small_model, tmp_path):
    """From the pods' real KV events (medium SHARED), the router credits B with a prompt only
    A computed: A through its own cache, B through the shared tier."""
    import json

    from conftest import RouterProcess

    a, b = instances["shared-a"], instances["shared-b"]
    audit = tmp_path / "audit.jsonl"
    args = ["--pod", a.url, "--pod", b.url, "--tokenizer", str(small_model)]
    router = RouterProcess([*args, "--audit-log", str(audit)], LOG_DIR / "router-shared.log")
    try:
        router.wait_ready()
        before = _snapshot(a)["stored_chunks"]
        _generate(a, prompts["routed"])  # A computes it and stores its 7 chunks
        _generate(b, prompts["b_miss"])  # B's lookup (a miss) makes it a member of the tier
        deadline = time.monotonic() + 60
        while _snapshot(a)["stored_chunks"] - before < 7:
            assert time.monotonic() < deadline, "A never reported its stores"
            _poke(a)  # a store's report rides the step after it ended
            time.sleep(0.3)
        _poke(a)  # the step that turns the last report into events
        while (
            _router_metric(router, "llmd:router_shared_tier_pods") < 2
            or _router_metric(router, "llmd:router_shared_tier_blocks") < 2 * SHARED_TOKENS / 128
        ):
            assert time.monotonic() < deadline, "the router never saw the shared tier's events"
            time.sleep(0.3)

        body = {"model": a.model_name, "prompt": prompts["routed"], "max_tokens": 2}
        request = urllib.request.Request(
            router.url + "/v1/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.status == 200
            response.read()  # the audit line is written before the answer's last byte
        record = json.loads(audit.read_text().splitlines()[-1])
        blocks = SHARED_TOKENS // 128  # vLLM's CPU block size
        pod_a, pod_b = a.url, b.url  # a pod's id is its URL
        assert record["cached_blocks"][pod_b] >= blocks, record
        assert record["shared_blocks"][pod_b] == record["cached_blocks"][pod_b], record
        assert record["cached_blocks"][pod_a] >= blocks and record["shared_blocks"][pod_a] == 0
    finally:
        router.stop()


@needs_lmcache
@pytest.mark.server
def test_lmcache_server_down_recompute_then_reconnect(instances, vllm_lmcache, prompts):
    b, ref = instances["shared-b"], instances["shared-reference"]
    lmcache_b = vllm_lmcache["b"]
    unreachable = "is unreachable"
    back = "answers again; shared tier back on"
    downs, ups = b.log_text().count(unreachable), b.log_text().count(back)

    lmcache_b.kill()
    output, moved, elapsed = _served(b, prompts["while_down"])
    assert output == _reference(ref, prompts["while_down"], None)
    assert moved["external_kv_transfer"] == 0 and moved["local_compute"] == PROMPT_TOKENS
    assert elapsed < 20, elapsed  # bounded by shared_tier_timeout_s, no hang
    _wait_log(b, unreachable, downs + 2)  # scheduler and worker: one line each
    assert b.is_running()

    lmcache_b.start().wait_ready()
    _wait_log(b, back, ups + 2)  # both reconnect (the worker re-registers) without a restart
    output, moved, _ = _served(b, prompts["after_restart"])  # A stored it before the kill
    assert moved["loaded_tokens"] == SHARED_TOKENS, moved
    assert moved["external_kv_transfer"] == SHARED_TOKENS, moved
    assert output == _reference(ref, prompts["after_restart"], SHARED_TOKENS)


@needs_lmcache
@pytest.mark.server
def test_interop_with_vllms_lmcache_mp_connector(
    instances, vllm_servers, small_model, vllm_lmcache, prompts, redis_url
):
    """vLLM's own LMCacheMPConnector on server A and LLMDConnector on server B share chunks."""
    import redis

    b, ref = instances["shared-b"], instances["shared-reference"]
    instances["shared-a"].stop()  # make room; its LMCache server now serves the other connector
    mp = vllm_servers.launch(
        _lmcache_mp_config(small_model, "0", vllm_lmcache["a"]), "shared-lmcache-mp"
    )
    client = redis.Redis.from_url(redis_url)
    stored = len(list(client.scan_iter(match=f"{small_model}@*", count=1000)))
    client.close()
    try:
        # ours → theirs
        before = _snapshot(b)
        _served(b, prompts["b_to_mp"])
        _wait_in_redis(redis_url, small_model, stored + 7)
        _poke(b)
        assert _snapshot(b)["stored_chunks"] - before["stored_chunks"] == 7
        output, moved, _ = _served(mp, prompts["b_to_mp"])
        assert moved["external_kv_transfer"] == SHARED_TOKENS, moved
        assert output == _reference(ref, prompts["b_to_mp"], SHARED_TOKENS)
        # theirs → ours
        _, moved, _ = _served(mp, prompts["mp_to_b"])
        assert moved["external_kv_transfer"] == 0, moved
        _wait_in_redis(redis_url, small_model, stored + 14)
        output, moved, _ = _served(b, prompts["mp_to_b"])
        assert moved["loaded_tokens"] == SHARED_TOKENS, moved
        assert moved["external_kv_transfer"] == SHARED_TOKENS, moved
        assert output == _reference(ref, prompts["mp_to_b"], SHARED_TOKENS)
    finally:
        mp.stop()
