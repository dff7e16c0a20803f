"""The shared tier's halves on real LMCache MP servers sharing one Redis ("two hosts"), no vLLM.

Chunks of a paged cache (vLLM's CPU layout, and the GPU backends' page order) stored through
server A come back bit-exact through server B, in the bytes LMCache's own gather writes; a
lookup miss releases its locks; a hung server costs one timeout, then fails fast and comes back.
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
from types import SimpleNamespace

import pytest
import torch
from factories import BLOCK, make_paged_cache
from shared_tier_harness import CHUNK, lmcache_pair, needs_lmcache

from vllm_llmd.connector.metadata import LLMDConnectorMetadata
from vllm_llmd.connector.request_state import RequestState
from vllm_llmd.ops.layouts import KVCacheShape
from vllm_llmd.shared_tier.client import SharedTierClient
from vllm_llmd.shared_tier.lmcache_server import LMCacheServer
from vllm_llmd.shared_tier.messages import SharedStoreSpec
from vllm_llmd.shared_tier.planner import SharedTierPlanner
from vllm_llmd.shared_tier.worker import SharedTierWorker

SHAPE = KVCacheShape(num_layers=3, num_blocks=64, num_heads=2, block_size=BLOCK, content=16)
MODEL = "fake/model"


@pytest.fixture(scope="module")
def lmcache_servers(redis_url):
    yield from lmcache_pair(redis_url)


class Counts:
    def __init__(self) -> None:
        self.values: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()

    def __call__(self, key: str, amount: int) -> None:
        with self.lock:
            self.values[key] += amount

    def wait_for(self, key: str, value: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.values[key] < value:
            assert time.monotonic() < deadline, f"{key}: {dict(self.values)}"
            time.sleep(0.02)


def _worker(
    server: LMCacheServer, seed: int, counts: Counts, layout: str = "LBHNC"
) -> tuple[SharedTierWorker, object]:
    cache, paged = make_paged_cache(layout, SHAPE, seed=seed)
    worker = SharedTierWorker(
        server.url,
        cache.kv_caches,
        paged,
        model_name=MODEL,
        world_size=1,
        worker_id=0,
        chunk_tokens=CHUNK,
        timeout_s=5,
        retry_s=0.5,
        max_inflight_chunks=64,
        count=counts,
    )
    assert worker.client.wait_up(20), server.log_tail()
    return worker, cache


def _request(tokens: list[int]) -> SimpleNamespace:
    return SimpleNamespace(request_id=uuid.uuid4().hex, prompt_token_ids=tokens, cache_salt=None)


def _lookup(planner: SharedTierPlanner, state: RequestState, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while (hit := planner.hit(state, 0)) is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return hit


@needs_lmcache
@pytest.mark.parametrize("kv_layout", ["LBHNC", "LBNHC", "BLNHC"])
def test_layout_is_lmcaches_own(kv_layout):
    """Our chunk bytes are what LMCache's own gather writes for the same blocks: vLLM's CPU
    layout (LBHNC, LMCache detects it), and the GPU backends' LBNHC and its block-outermost
    form, as LMCache sees them on a GPU (physical [blocks, block_size, heads, C] per layer,
    format NL_X_NB_BS_NH_CS); CPU tensors here, the same bytes."""
    import lmcache.lmcache_native as lmcache_native
    from lmcache.v1.multiprocess.transfer_context.base import gather_paged_kv_to_cpu

    from vllm_llmd.ops import gather_blocks
    from vllm_llmd.shared_tier.layout import ChunkLayout

    cache, paged = make_paged_cache(kv_layout, SHAPE)
    layout = ChunkLayout.from_kv_caches(cache.kv_caches, paged, CHUNK)
    assert layout.page_order == ("HNC" if kv_layout == "LBHNC" else "NHC")
    block_ids = [5, 9, 1, 40, 2, 3, 4, 6, 11, 12, 13, 14, 15, 16, 17, 18]  # two chunks
    if kv_layout == "LBHNC":
        theirs = gather_paged_kv_to_cpu(cache.kv_caches, block_ids, layout.blocks_per_chunk)
    else:
        physical = {name: t.permute(0, 2, 1, 3) for name, t in cache.kv_caches.items()}
        theirs = gather_paged_kv_to_cpu(
            physical,
            block_ids,
            layout.blocks_per_chunk,
            engine_kv_format=lmcache_native.EngineKVFormat.NL_X_NB_BS_NH_CS,
        )
    staging = torch.empty(paged.buffer_bytes(len(block_ids)), dtype=torch.uint8)
    gather_blocks(paged, block_ids, staging)
    for index, chunk in enumerate(theirs):
        ours = torch.empty(layout.chunk_shape, dtype=torch.float32)
        layout.to_chunk(
            staging[index * layout.chunk_bytes : (index + 1) * layout.chunk_bytes], ours
        )
        assert torch.equal(ours.view(torch.int32), chunk.view(torch.int32))  # NaN bytes too
        back = torch.empty(layout.chunk_bytes, dtype=torch.uint8)
        layout.from_chunk(chunk, back)
        assert torch.equal(
            back, staging[index * layout.chunk_bytes : (index + 1) * layout.chunk_bytes]
        )


@needs_lmcache
@pytest.mark.parametrize("kv_layout", ["LBHNC", "LBNHC"])
def test_store_on_a_load_on_b_bit_exact(lmcache_servers, kv_layout):
    """A stores, B (its own server) loads the same bytes: vLLM's CPU layout and the GPU
    backends' default page order (CPU tensors: the CUDA part is the copy kernels' job)."""
    counts_a, counts_b = Counts(), Counts()
    worker_a, cache_a = _worker(lmcache_servers["a"], 1, counts_a, kv_layout)
    worker_b, cache_b = _worker(lmcache_servers["b"], 2, counts_b, kv_layout)
    offset = 0 if kv_layout == "LBHNC" else 1  # other tokens: the other run's chunks differ
    planner_b = SharedTierPlanner(
        SharedTierClient(lmcache_servers["b"].url, 5, 0.5, name="sched-b"),
        MODEL,
        world_size=1,
        block_size=BLOCK,
        chunk_tokens=CHUNK,
    )
    try:
        assert planner_b.client.wait_up(20)
        tokens = [(7 * i + 3 + offset) % 5000 for i in range(3 * CHUNK + 100)]  # 3 chunks + tail
        blocks_a = list(range(10, 10 + 3 * CHUNK // BLOCK))
        state = RequestState(_request(tokens))
        worker_a.submit_stores(
            [
                SharedStoreSpec(
                    state.request_id, tuple(tokens[: 3 * CHUNK]), 0, 3 * CHUNK, tuple(blocks_a)
                )
            ]
        )
        worker_a.flush_stores()
        counts_a.wait_for("shared_stored_chunks", 3)

        # B's lookup goes to server B, which finds the chunks in Redis (A's L2 writes are async)
        deadline = time.monotonic() + 20
        while (hit := _lookup(planner_b, state)) < 3 * CHUNK:
            assert time.monotonic() < deadline, hit
            planner_b.finish(state)
            state = RequestState(_request(tokens))
            time.sleep(0.2)
        # 2 blocks already local: the first chunk is read whole, its first 2 blocks skipped
        first_token = 2 * BLOCK
        blocks_b = list(range(30, 30 + (3 * CHUNK - first_token) // BLOCK))
        planner_b.plan_load(state, first_token, blocks_b)
        step = LLMDConnectorMetadata()
        planner_b.take_step(step)
        (load,), stores = step.shared_loads, step.shared_stores
        assert (load.start, load.end, load.skip_blocks, load.num_tokens) == (0, 768, 2, 704)
        assert stores == []
        assert worker_b.load(load).result(timeout=20) == 704
        planner_b.finish(state)

        for layer in range(SHAPE.num_layers):
            for block_a, block_b in zip(blocks_a[2:], blocks_b, strict=True):
                assert torch.equal(
                    cache_a.block_bytes(layer, block_a), cache_b.block_bytes(layer, block_b)
                )
        assert counts_b.values["shared_loaded_tokens"] == 704
        assert counts_b.values["shared_load_failures"] == 0

        # the same chunks stored again through A: its server holds them, nothing is written
        # (B's server dropped them after the load: LMCache keeps Redis-prefetched chunks only
        # until they are read)
        worker_a.submit_stores(
            [SharedStoreSpec("again", tuple(tokens[: 3 * CHUNK]), 0, 3 * CHUNK, tuple(blocks_a))]
        )
        worker_a.flush_stores()
        counts_a.wait_for("shared_store_skipped_chunks", 3)
        assert counts_a.values["shared_stored_chunks"] == 3
    finally:
        planner_b.close()
        worker_a.shutdown()
        worker_b.shutdown()


@needs_lmcache
def test_lookup_misses_are_zero_and_locks_are_released(lmcache_servers):
    counts = Counts()
    worker, _ = _worker(lmcache_servers["a"], 3, counts)
    planner = SharedTierPlanner(
        SharedTierClient(lmcache_servers["a"].url, 5, 0.5, name="sched-a"),
        MODEL,
        world_size=1,
        block_size=BLOCK,
        chunk_tokens=CHUNK,
    )
    try:
        assert planner.client.wait_up(20)
        # no full chunk: no lookup
        assert planner.hit(RequestState(_request(list(range(CHUNK - 1)))), 0) == 0
        state = RequestState(_request([9000 + i for i in range(2 * CHUNK)]))
        assert _lookup(planner, state) == 0
        planner.finish(state)
        assert state.holds_nothing()  # no lookup, no session left
    finally:
        planner.close()
        worker.shutdown()


@needs_lmcache
def test_hung_server_costs_one_timeout_then_fails_fast_and_comes_back(lmcache_servers):
    """SIGSTOP the server mid-life (a hang, not a crash): bounded waits, nothing left held."""
    import signal

    server = lmcache_servers["a"]
    counts = Counts()
    worker, _ = _worker(server, 4, counts)
    planner = SharedTierPlanner(
        SharedTierClient(server.url, 1.0, 0.3, name="sched-hung"),
        MODEL,
        world_size=1,
        block_size=BLOCK,
        chunk_tokens=CHUNK,
    )
    tokens = [4000 + i for i in range(2 * CHUNK)]
    try:
        assert planner.client.wait_up(20)
        server.process.send_signal(signal.SIGSTOP)
        state = RequestState(_request(tokens))
        start = time.monotonic()
        assert _lookup(planner, state) == 0  # a miss once the timeout passed
        assert 0.9 < time.monotonic() - start < 3
        assert not planner.client.is_up
        # fails fast while down: no new lookup
        assert planner.hit(RequestState(_request(tokens)), 0) == 0
        planner.finish(state)

        # a store while the worker still thinks it is up: the step waits for the gather only
        started = time.monotonic()
        worker.submit_stores([SharedStoreSpec("s", tuple(tokens), 0, 2 * CHUNK, tuple(range(16)))])
        worker.flush_stores()
        assert time.monotonic() - started < 1
        counts.wait_for("shared_store_failures", 2)  # after its timeout, or dropped if down
        assert worker._inflight_chunks == 0
        assert not worker.client.wait_up(0.1)

        server.process.send_signal(signal.SIGCONT)
        assert planner.client.wait_up(20) and worker.client.wait_up(20)
        assert _lookup(planner, RequestState(_request(tokens))) == 0  # answers again
    finally:
        if server.process is not None:
            server.process.send_signal(signal.SIGCONT)
        planner.close()
        worker.shutdown()


@needs_lmcache
def test_a_url_where_no_server_answers_is_said_once(caplog):
    """Before, shared_tier_url pointing at nothing logged nothing at all, even at DEBUG."""
    import logging

    from vllm_llmd.devtools.server import free_port

    url = f"tcp://127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING, logger="vllm_llmd"):
        client = SharedTierClient(url, 0.3, 0.2, name="nowhere")
        try:
            deadline = time.monotonic() + 10
            while "no LMCache server answers" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)  # several more missed heartbeats: still one line
        finally:
            client.close()
    lines = [r.getMessage() for r in caplog.records if url in r.getMessage()]
    assert len(lines) == 1, lines
    assert "shared_tier_url" in lines[0] and "lmcache server" in lines[0]
    assert not client.is_up
