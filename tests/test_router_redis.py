"""Router replicas sharing one Redis block index: two real router processes, a real
redis-server (loopback, free port, no persistence) and the two shared vLLM pods.

One replica follows the pods' KV events; the other runs with `--no-ingest` and only reads the
shared index. Both must make the same decision for the same request, and each BlockStored must
be counted once. (Were both replicas to ingest, every block would be counted twice, and one
replica's restart, or a pod's health blip seen by one replica, would clear that pod's entries
for all of them: `EventIngestor.add_pod` and `remove_pod` call `clear_pod`.)"""

from __future__ import annotations

import time

import pytest
from router_harness import read_audit, router_args
from tokenizers import Tokenizer

from vllm_llmd.devtools.client import complete
from vllm_llmd.devtools.model_maker import sample_text
from vllm_llmd.router.config_parse import parse_config
from vllm_llmd.router.tokens import TokenProcessor

redis = pytest.importorskip("redis")
from vllm_llmd.router.redis_index import RedisIndex  # noqa: E402 (needs the redis client)

BLOCK = 128


def test_no_ingest_needs_redis():
    with pytest.raises(SystemExit):
        parse_config(["--pod", "http://127.0.0.1:1", "--no-ingest"], environ={})
    config = parse_config(
        ["--pod", "http://127.0.0.1:1", "--redis-url", "redis://127.0.0.1:1/0"],
        environ={"VLLM_LLMD_ROUTER_NO_INGEST": "1"},
    )
    assert config.no_ingest


def _wait_for_prefix(index: RedisIndex, hashes: list[int], pod: str, timeout: float = 20) -> None:
    """Until the shared index says `pod` holds every block of `hashes` (ingestion caught up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hit = index.lookup_prefix(hashes).get(pod)
        if hit is not None and hit.num_blocks == len(hashes):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{pod} never held the prefix: {index.lookup_prefix(hashes)}")


@pytest.mark.server
def test_replicas_sharing_redis_make_the_same_decision(
    router_pods, tiny_model, redis_url, start_router, tmp_path
):
    tokenizer = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    hasher = TokenProcessor(tiny_model, BLOCK)
    index = RedisIndex(redis_url)
    model = router_pods[0].model_name
    common = {"tokenizer": tiny_model, "redis_url": redis_url, "poll_interval_s": 0.2}
    audits = [tmp_path / "audit-1.jsonl", tmp_path / "audit-2.jsonl"]
    pod_urls = [pod.url for pod in router_pods]
    ingesting = start_router(
        router_args(*pod_urls, **common, audit_log=audits[0]), "router-redis-1"
    )

    # Two prefixes: one routed by replica 1 (an idle tie: the smallest pod id), one sent to the
    # other pod directly, so that following the cache and breaking the tie disagree.
    prefixes = [
        tokenizer.encode(sample_text(5 * BLOCK, seed=1600 + i)).ids[: 4 * BLOCK] for i in range(2)
    ]
    complete(ingesting.url, model, [*prefixes[0], 11, 12, 13], max_tokens=2)
    holders = [read_audit(audits[0])[0]["pod"]]
    holders.append(next(p.url for p in router_pods if p.url != holders[0]))
    complete(holders[1], model, [*prefixes[1], 11, 12, 13], max_tokens=2)
    hashes = [list(hasher.hash(prefix).block_hashes) for prefix in prefixes]
    for prefix_hashes, holder in zip(hashes, holders, strict=True):
        _wait_for_prefix(index, prefix_hashes, holder)

    # Replica 2 reads the same index and follows no events (its start clears nothing).
    args = router_args(*reversed(pod_urls), **common, audit_log=audits[1], no_ingest=True)
    reading = start_router(args, "router-redis-2")
    for prefix in prefixes:
        for router in (ingesting, reading):
            complete(router.url, model, [*prefix, 21, 22, 23, 24], max_tokens=2)

    first = read_audit(audits[0])[1:]
    second = read_audit(audits[1])
    decided = [[(r["pod"], r["hit_tokens"]) for r in records] for records in (first, second)]
    expected = [(holder, 4 * BLOCK) for holder in holders]
    assert decided == [expected, expected]
    assert "following KV events" not in reading.log_path.read_text()

    # One writer: each block the pods stored is counted once, not once per replica.
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    for prefix_hashes, holder in zip(hashes, holders, strict=True):
        counts = [client.hget(f"llmd:blk:{h}", f"{holder}|GPU") for h in prefix_hashes]
        assert counts == ["1"] * 4, counts
    client.close()
    index.close()
