"""vllm-llmd-router end to end: a real router process before two real vLLM pods (tiny model,
LLMDConnector with a host tier, KV events on). Requests with a cached prefix go to the pod that
holds it (by the router's audit log and the pods' own prefix-hit metrics); a busy pod loses
requests to an idle one; a killed pod's traffic moves to the other without a failed request;
with --pull-from-holders a pod without a prefix pulls its KV from the pod that holds it, and a
hot prefix copied ahead of demand is pulled and then hit."""

from __future__ import annotations

import time

import pytest
from conftest import KeepBusy, router_pod_config
from router_harness import read_audit, router_args, wait_for
from tokenizers import Tokenizer

from vllm_llmd.devtools.client import (
    complete,
    completion_token_ids,
    metric_sum,
    scrape_metrics,
)
from vllm_llmd.devtools.model_maker import sample_text

pytestmark = pytest.mark.server

BLOCK = 128


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return Tokenizer.from_file(str(tiny_model / "tokenizer.json"))


def _cache_hits(server) -> float:
    return metric_sum(
        scrape_metrics(server.url), "vllm:prompt_tokens_by_source_total", source="local_cache_hit"
    )


def test_cached_prefix_goes_to_the_pod_that_holds_it(
    router_pods, tiny_model, tokenizer, start_router, tmp_path
):
    audit = tmp_path / "audit.jsonl"
    pod_urls = [pod.url for pod in router_pods]
    args = router_args(*pod_urls, policy="kv_aware", tokenizer=tiny_model, audit_log=audit)
    router = start_router(args, "router-affinity")
    model = router_pods[0].model_name
    hits_before = {p.url: _cache_hits(p) for p in router_pods}
    for i in range(4):
        shared = tokenizer.encode(sample_text(5 * BLOCK, seed=1200 + i)).ids[: 4 * BLOCK]
        complete(router.url, model, [*shared, 11, 12, 13], max_tokens=2)
        time.sleep(1.0)  # the pod's BlockStored events reach the router's index
        complete(router.url, model, [*shared, 21, 22, 23, 24], max_tokens=2)

    records = read_audit(audit)
    assert len(records) == 8
    for first, again in zip(records[::2], records[1::2], strict=True):
        assert again["pod"] == first["pod"], (first, again)
        assert again["hit_tokens"] == 4 * BLOCK and first["hit_tokens"] == 0
    # The pods agree: each second request hit its pod's prefix cache.
    gained = sum(_cache_hits(p) - hits_before[p.url] for p in router_pods)
    assert gained >= 4 * 4 * BLOCK
    metrics = scrape_metrics(router.url)
    assert metric_sum(metrics, "llmd:router_decisions_total", kind="direct") == 8
    assert metric_sum(metrics, "llmd:router_index_entries") > 0


def test_busy_pod_loses_requests_to_an_idle_one(
    router_pods, tiny_model, tokenizer, start_router, tmp_path
):
    audit = tmp_path / "audit.jsonl"
    # The busy pod is the one that wins a tie (policies break ties by pod URL), so a router
    # that ignored load would send it every request.
    busy, idle = sorted(router_pods, key=lambda pod: pod.url)
    args = router_args(
        busy.url,
        idle.url,
        policy="kv_aware",
        tokenizer=tiny_model,
        audit_log=audit,
        poll_interval_s=0.2,
    )
    router = start_router(args, "router-load")
    # Route requests until three decisions were taken while the router saw the busy pod
    # generating (the tiny model is fast and the box slow: a load scrape can miss the batch).
    # Two keepers are enough to make it busy; more starve the idle pod too, and on CI's two
    # cores a two-token request there took up to 44 s beside four keepers.
    busy_seen: list[dict] = []
    with KeepBusy(busy.url, busy.model_name, 2, max_tokens=400, stagger=150, seed=1300):
        deadline = time.monotonic() + 240
        i = 0
        while len(busy_seen) < 3 and time.monotonic() < deadline:
            prompt = tokenizer.encode(sample_text(200, seed=1400 + i)).ids
            complete(router.url, busy.model_name, prompt, max_tokens=2)
            record = read_audit(audit)[-1]
            if record["loads"][busy.url]["running"] >= 1:
                busy_seen.append(record)
            i += 1
    assert len(busy_seen) == 3, f"the router never saw the busy pod busy: {read_audit(audit)}"
    chosen = [r["pod"] for r in busy_seen]
    assert chosen == [idle.url] * 3, busy_seen
    # the pods' KV cache sizes reach the router (vllm:cache_config_info): its room check
    assert all(r["loads"][pod.url]["kv_blocks"] > 0 for r in busy_seen for pod in router_pods)


def test_killed_pod_traffic_moves_without_failures(
    router_pods, tiny_model, tokenizer, start_router, vllm_servers, tmp_path
):
    audit = tmp_path / "audit.jsonl"
    spare = vllm_servers.launch(router_pod_config(tiny_model, "1", "spare"), "router-pod-spare")
    args = router_args(
        router_pods[0].url,
        spare.url,
        policy="round_robin",
        tokenizer=tiny_model,
        audit_log=audit,
        poll_interval_s=0.5,
    )
    router = start_router(args, "router-failover")
    prompt = tokenizer.encode(sample_text(100, seed=1500)).ids
    for _ in range(2):
        complete(router.url, spare.model_name, prompt, max_tokens=2)
    spare.stop()
    for _ in range(6):  # no request fails: the dead pod is retried past, then dropped
        complete(router.url, router_pods[0].model_name, prompt, max_tokens=2)
    records = read_audit(audit)
    assert {r["pod"] for r in records[:2]} == {router_pods[0].url, spare.url}
    time.sleep(1.5)
    metrics = scrape_metrics(router.url)
    assert metric_sum(metrics, "llmd:router_pod_healthy", pod=spare.url) == 0
    assert metric_sum(metrics, "llmd:router_requests_total", status="200") == 8


def test_a_pod_without_the_prefix_pulls_its_kv_from_the_pod_that_holds_it(
    router_pods, tiny_model, tokenizer, start_router, tmp_path, redis_url
):
    """Round robin sends the prompt to both pods in turn; the one that lacks it gets a P/D
    route whose first step runs on the holder (computing only the prompt's tail), and pulls
    the prefix from it instead of computing it. Outputs equal the holder's own."""
    from vllm_llmd.hashing import PrefixHasher
    from vllm_llmd.router.redis_index import RedisIndex

    audit = tmp_path / "audit.jsonl"
    holder, other = sorted(router_pods, key=lambda pod: pod.url)
    model = holder.model_name
    # (seeds 1400 + i of the load test above can run past 1500: a seed of its own here)
    prompt = tokenizer.encode(sample_text(6 * BLOCK, seed=91_500)).ids[: 4 * BLOCK + 20]
    expected = completion_token_ids(complete(holder.url, model, prompt, max_tokens=4))
    pulled_before = metric_sum(scrape_metrics(other.url), "llmd:pd_pulled_tokens_total")
    args = router_args(
        holder.url,
        other.url,
        policy="round_robin",
        tokenizer=tiny_model,
        audit_log=audit,
        pull_from_holders=True,
        pd_threshold_tokens=2 * BLOCK,
        redis_url=redis_url,  # the router's index, read here
    )
    router = start_router(args, "router-pull")
    # the router's index holds the holder's blocks of the prompt (from its replay) before
    # any request of it is routed: else the other pod could compute it first
    index, hashes = RedisIndex(redis_url), PrefixHasher(BLOCK).event_hashes(prompt)
    try:
        wait_for(lambda: holder.url in index.lookup_prefix(hashes), 30)
        assert index.lookup_prefix(hashes)[holder.url].num_blocks == 4
    finally:
        index.close()
    for _ in range(2):  # round robin: one request to each pod
        answer = complete(router.url, model, prompt, max_tokens=4)
        assert completion_token_ids(answer) == expected
    records = read_audit(audit)
    [pull] = [r for r in records if r["kind"] == "pd"]
    assert (pull["prefill_pod"], pull["decode_pod"]) == (holder.url, other.url)
    assert pull["prefill_reason"].startswith("KV source: holds 4 more blocks of the prompt than")
    assert pull["prefilled"] and pull["status"] == 200
    pulled = metric_sum(scrape_metrics(other.url), "llmd:pd_pulled_tokens_total") - pulled_before
    assert pulled >= 4 * BLOCK
    [direct] = [r for r in records if r["kind"] == "direct"]
    assert direct["pod"] == holder.url and direct["hit_tokens"] == 4 * BLOCK


def test_a_hot_prefix_copied_ahead_of_demand_is_pulled_and_then_hit_on_the_other_pod(
    router_pods, tiny_model, tokenizer
):
    """The copy `--replicate-hot-prefixes` starts (its trigger is tested against a real router
    in test_router_replication.py), between real pods: the pod lacking the prefix pulls it
    from the holder over the side channel, and the next request of the prompt there hits it
    in its own cache, with the holder's output."""
    import asyncio

    import aiohttp
    from prometheus_client import generate_latest

    from vllm_llmd.prometheus_text import parse_prometheus_text
    from vllm_llmd.router.metrics import RouterMetrics
    from vllm_llmd.router.off_loop import OffLoop
    from vllm_llmd.router.replication import HotPrefixes, Replication, Replicator
    from vllm_llmd.router.tokens import TokenProcessor

    holder, other = sorted(router_pods, key=lambda pod: pod.url)
    model = holder.model_name
    prompt = tokenizer.encode(sample_text(6 * BLOCK, seed=92_500)).ids[: 4 * BLOCK + 20]
    expected = completion_token_ids(complete(holder.url, model, prompt, max_tokens=4))
    pulled_before = metric_sum(scrape_metrics(other.url), "llmd:pd_pulled_tokens_total")
    tokens = TokenProcessor(tiny_model, BLOCK)
    hashes = tokens.tokenize_request("/v1/completions", {"prompt": prompt}).block_hashes

    async def copy() -> None:
        metrics, tokenize = RouterMetrics(), OffLoop("test-copy", 1, 10.0)
        replicator = Replicator(HotPrefixes(1, 1, BLOCK), tokens, tokenize, metrics, None)
        planned = Replication(holder.url, other.url, 4, hashes[3])
        try:
            async with aiohttp.ClientSession() as session:
                await replicator._run(
                    session,
                    [planned],
                    hashes,
                    "/v1/completions",
                    {"model": model, "prompt": prompt},
                )
        finally:
            tokenize.close()
        counts = parse_prometheus_text(generate_latest(metrics.registry).decode())
        assert metric_sum(counts, "llmd:router_prefix_copies_total", outcome="done") == 1

    asyncio.run(copy())
    pulled = metric_sum(scrape_metrics(other.url), "llmd:pd_pulled_tokens_total") - pulled_before
    assert pulled >= 4 * BLOCK
    hits_before = _cache_hits(other)
    assert completion_token_ids(complete(other.url, model, prompt, max_tokens=4)) == expected
    assert _cache_hits(other) - hits_before >= 4 * BLOCK
