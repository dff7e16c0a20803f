"""The shared KV tier on real LMCache MP servers sharing one Redis ("two hosts").

Part 1 (no vLLM): the client halves against two `lmcache server`s: chunks of a fake paged cache
(vLLM's CPU layout) stored through server A come back bit-exact through server B, in the bytes
LMCache's own CPU gather writes.
Part 2 (real vLLM): two vLLM servers with LLMDConnector, each on its own LMCache server: a
prompt served by A is loaded by B from the shared tier; B's LMCache server killed and restarted.
"""

from __future__ import annotations

import collections
import importlib.util
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from factories import make_fingerprint

from vllm_llmd.connector.config import LLMDConnectorConfig
from vllm_llmd.connector.metadata import LLMDConnectorMetadata
from vllm_llmd.connector.request_state import RequestState
from vllm_llmd.ops import PagedKVCache
from vllm_llmd.ops.layouts import KVCacheShape, allocate_kv_caches
from vllm_llmd.shared.client import SharedTierClient, import_lmcache
from vllm_llmd.shared.devserver import LMCacheServer, LMCacheServerConfig
from vllm_llmd.shared.messages import SharedStoreSpec
from vllm_llmd.shared.planner import SharedTierPlanner
from vllm_llmd.shared.worker import SharedTierWorker

LOG_DIR = Path(__file__).resolve().parents[1] / "logs" / "tests"
CHUNK = 256
BLOCK = 32
SHAPE = KVCacheShape(num_layers=3, num_blocks=64, num_heads=2, block_size=BLOCK, content=16)
MODEL = "fake/model"

needs_lmcache = pytest.mark.skipif(
    importlib.util.find_spec("lmcache") is None,
    reason="LMCache is not installed (pip install 'vllm-llmd[lmcache]')",
)


def test_without_lmcache_start_up_fails_naming_the_extra(monkeypatch):
    from vllm_llmd.connector.connector import make_shared_planner

    for name in [m for m in sys.modules if m == "lmcache" or m.startswith("lmcache.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "lmcache", None)  # any import of it fails
    with pytest.raises(ImportError, match=r"pip install 'vllm-llmd\[lmcache\]'"):
        import_lmcache()
    config = LLMDConnectorConfig.from_extra_config({"shared_tier_url": "tcp://127.0.0.1:1"})
    transfer = SimpleNamespace(kv_load_failure_policy="recompute")
    with pytest.raises(ImportError, match=r"vllm-llmd\[lmcache\]"):
        make_shared_planner(config, transfer, "m", 1, 128)
    # without the key the plugin does not need LMCache
    assert make_shared_planner(LLMDConnectorConfig(), transfer, "m", 1, 128) is None


def test_shared_tier_keys_are_checked():
    with pytest.raises(ValueError, match="shared_tier_timeout_s"):
        LLMDConnectorConfig.from_extra_config({"shared_tier_timeout_s": 0})
    with pytest.raises(ValueError, match="shared_tier_url"):
        LLMDConnectorConfig.from_extra_config({"shared_tier_url": 5601})


# ---- The scheduler half's bookkeeping, with a fake LMCache client (no LMCache needed) -------


class _Answered:
    def __init__(self, value: object) -> None:
        self.value = value

    def query(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> object:
        return self.value


class FakeLMCacheClient:
    """Answers every RPC at once; a lookup finds `hit_chunks` chunks."""

    timeout_s = 5.0

    def __init__(self, hit_chunks: int) -> None:
        self.hit_chunks = hit_chunks
        self.is_up = True
        self.calls: list[tuple[str, object]] = []
        self.lmcache = SimpleNamespace(IPCCacheServerKey=lambda **kw: SimpleNamespace(**kw))

    def submit(self, method: str, *args: object) -> _Answered:
        key = args[0]
        self.calls.append((method, (key.start, key.end) if hasattr(key, "start") else key))
        return _Answered(self.hit_chunks if method == "query_prefetch_status" else None)

    def wait(self, future: _Answered, what: str, timeout_s: float | None = None) -> object:
        return future.result()

    def mark_down(self, reason: str) -> None:
        self.is_up = False

    def close(self) -> None:
        pass


def _shared_scheduler(hit_chunks: int, publish_events: bool = False):
    from vllm_llmd.connector.scheduler import LLMDConnectorScheduler

    fingerprint = make_fingerprint()
    client = FakeLMCacheClient(hit_chunks)
    planner = SharedTierPlanner(client, "m", 1, BLOCK, CHUNK)
    scheduler = LLMDConnectorScheduler(
        LLMDConnectorConfig(),
        "e",
        fingerprint,
        True,
        True,
        shared=planner,
        publish_events=publish_events,
    )
    return scheduler, planner, client


def _vllm_request(num_tokens: int, request_id: str = "req-s"):
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.request import Request

    kv_cache_utils.init_none_hash(sha256)
    hasher = kv_cache_utils.get_request_block_hasher(BLOCK, sha256)
    return Request(
        request_id, list(range(num_tokens)), SamplingParams(max_tokens=1), None, block_hasher=hasher
    )


def _ask(scheduler, request, num_computed: int) -> tuple[int | None, bool]:
    for _ in range(5):
        answer = scheduler.get_num_new_matched_tokens(request, num_computed)
        if answer[0] is not None:
            return answer
    raise AssertionError("the lookup never finished")


def _assert_nothing_held(scheduler, request) -> None:
    # no lookup, lock, session or offered range left: all of it lives in the request's state
    state = scheduler.state_of(request.request_id)
    if state is not None:  # finished with its load in flight: dropped at finished_recving
        assert state.is_finished and state.load_in_flight
        assert state.shared_lookup is None and not state.shared_session


def test_scheduler_loads_the_shared_hit_past_the_local_one_and_frees_the_rest():
    scheduler, _, client = _shared_scheduler(hit_chunks=3)
    request = _vllm_request(3 * CHUNK + 40)
    assert scheduler.get_num_new_matched_tokens(request, 9 * BLOCK) == (None, False)
    assert _ask(scheduler, request, 9 * BLOCK) == (3 * CHUNK - 9 * BLOCK, True)
    block_ids = list(range(100, 100 + 26))
    blocks = SimpleNamespace(get_block_ids=lambda: (block_ids,))
    scheduler.update_state_after_alloc(request, blocks, 3 * CHUNK - 9 * BLOCK)
    output = SimpleNamespace(kv_connector_block_state=None, num_scheduled_tokens={})
    [load] = scheduler.build_connector_meta(output).shared_loads
    # chunk 1 (tokens 256..512) holds local block 9 (skipped); chunk 0 is all local: freed
    assert (load.start, load.end, load.skip_blocks) == (CHUNK, 3 * CHUNK, 1)
    assert load.block_ids == tuple(block_ids[9:24]) and load.num_tokens == 480
    assert ("free_lookup_locks", (0, CHUNK)) in client.calls
    scheduler.request_finished(request, block_ids)
    assert client.calls[-1] == ("end_session", "req-s")
    _assert_nothing_held(scheduler, request)


def test_scheduler_frees_every_lock_when_vllm_loads_nothing():
    scheduler, _, client = _shared_scheduler(hit_chunks=2)
    request = _vllm_request(3 * CHUNK)
    assert _ask(scheduler, request, 0) == (2 * CHUNK, True)
    scheduler.update_state_after_alloc(request, SimpleNamespace(), 0)
    assert ("free_lookup_locks", (0, 2 * CHUNK)) in client.calls
    scheduler.request_finished(request, [])
    _assert_nothing_held(scheduler, request)


def test_scheduler_stores_new_full_chunks_once():
    scheduler, _, _ = _shared_scheduler(hit_chunks=0)
    request = _vllm_request(3 * CHUNK + 40)
    assert _ask(scheduler, request, 0) == (0, False)
    block_ids = list(range(26))
    state = SimpleNamespace(get_block_ids=lambda rid: (block_ids,))
    output = SimpleNamespace(
        kv_connector_block_state=state, num_scheduled_tokens={"req-s": 2 * CHUNK + 10}
    )
    [store] = scheduler.build_connector_meta(output).shared_stores
    assert (store.start, store.end, store.block_ids) == (0, 2 * CHUNK, tuple(range(16)))
    assert store.token_ids == tuple(range(2 * CHUNK))
    request.num_computed_tokens = 2 * CHUNK + 10
    output.num_scheduled_tokens = {"req-s": CHUNK + 30}
    [store] = scheduler.build_connector_meta(output).shared_stores
    assert (store.start, store.end, store.block_ids) == (2 * CHUNK, 3 * CHUNK, tuple(range(16, 24)))
    assert scheduler.build_connector_meta(output).shared_stores == []
    scheduler.request_finished(request, block_ids)
    _assert_nothing_held(scheduler, request)


def test_events_say_what_the_shared_tier_holds():
    """Medium SHARED: a lookup's hit blocks are stored and its first missing block removed; a
    store is announced once the worker reports it done, never when it failed."""
    from vllm.distributed.kv_events import BlockRemoved, BlockStored
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash
    from vllm.v1.outputs import KVConnectorOutput

    from vllm_llmd.connector.metadata import LLMDWorkerMetadata
    from vllm_llmd.offload.jobs import JobKind, JobTally

    scheduler, planner, _ = _shared_scheduler(hit_chunks=1, publish_events=True)
    request = _vllm_request(3 * CHUNK + 40)
    hashes = [maybe_convert_block_hash(h) for h in request.block_hashes]
    assert _ask(scheduler, request, 0) == (CHUNK, True)
    stored, removed = scheduler.take_events()
    assert isinstance(stored, BlockStored) and isinstance(removed, BlockRemoved)
    assert stored.medium == removed.medium == "SHARED"
    assert stored.block_hashes == hashes[:8] and stored.parent_block_hash is None
    assert stored.token_ids == list(range(CHUNK)) and stored.block_size == BLOCK
    assert removed.block_hashes == [hashes[8]]  # one hash cuts a consumer's run there

    block_ids = list(range(26))
    scheduler.update_state_after_alloc(
        request, SimpleNamespace(get_block_ids=lambda: (block_ids,)), CHUNK
    )
    state = SimpleNamespace(get_block_ids=lambda rid: (block_ids,))
    output = SimpleNamespace(kv_connector_block_state=state, num_scheduled_tokens={"req-s": 400})
    request.num_computed_tokens = CHUNK
    [store] = scheduler.build_connector_meta(output).shared_stores
    assert (store.start, store.end) == (CHUNK, 2 * CHUNK)
    assert scheduler.take_events() == []  # not until the worker says it is done
    report = LLMDWorkerMetadata(JobTally({JobKind.SHARED_STORE: {store.key: [1, 0]}}))
    scheduler.update_connector_output(KVConnectorOutput(kv_connector_worker_meta=report))
    [announced] = scheduler.take_events()
    assert announced.medium == "SHARED" and announced.block_hashes == hashes[8:16]
    assert announced.parent_block_hash == hashes[7]

    request.num_computed_tokens = CHUNK + 400
    output.num_scheduled_tokens = {"req-s": 3 * CHUNK + 40 - request.num_computed_tokens}
    [store] = scheduler.build_connector_meta(output).shared_stores
    report = LLMDWorkerMetadata(JobTally({JobKind.SHARED_STORE: {store.key: [0, 1]}}))
    scheduler.update_connector_output(KVConnectorOutput(kv_connector_worker_meta=report))
    assert scheduler.take_events() == []  # failed: nothing to announce, nothing kept
    assert planner._unconfirmed == {}
    scheduler.request_finished(request, block_ids)
    _assert_nothing_held(scheduler, request)


def test_a_down_server_is_a_miss_without_a_call():
    scheduler, _, client = _shared_scheduler(hit_chunks=3)
    client.is_up = False
    request = _vllm_request(3 * CHUNK)
    assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
    assert client.calls == []
    scheduler.request_finished(request, [])
    _assert_nothing_held(scheduler, request)


@pytest.fixture(scope="module")
def lmcache_servers(redis_url):
    servers = {
        name: LMCacheServer(
            LMCacheServerConfig(f"{name}{uuid.uuid4().hex[:6]}", redis_url=redis_url),
            LOG_DIR / f"lmcache-{name}.log",
        ).start()
        for name in ("a", "b")
    }
    try:
        for server in servers.values():
            server.wait_ready()
        yield servers
    finally:
        for server in servers.values():
            server.cleanup()


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
    cache = allocate_kv_caches(
        layout, SHAPE, torch.float32, generator=torch.Generator().manual_seed(seed)
    )
    worker = SharedTierWorker(
        server.url,
        cache.kv_caches,
        PagedKVCache.from_layers(cache.kv_caches),
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
    from vllm_llmd.shared.layout import ChunkLayout

    cache = allocate_kv_caches(kv_layout, SHAPE, torch.float32)
    paged = PagedKVCache.from_layers(cache.kv_caches)
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


# ---- Part 2: real vLLM servers ------------------------------------------------------------

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
    servers = {
        name: LMCacheServer(
            LMCacheServerConfig(f"v{name}{uuid.uuid4().hex[:6]}", redis_url=redis_url),
            LOG_DIR / f"lmcache-vllm-{name}.log",
        ).start()
        for name in ("a", "b")
    }
    try:
        for server in servers.values():
            server.wait_ready()
        yield servers
    finally:
        for server in servers.values():
            server.cleanup()


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
            _router_metric(router, "llmd_router_shared_tier_pods") < 2
            or _router_metric(router, "llmd_router_shared_tier_blocks") < 2 * SHARED_TOKENS / 128
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


@needs_lmcache
def test_heartbeat_survives_a_failing_check_and_logs_it(caplog):
    # A check callback that raises used to end the heartbeat thread silently: the tier then
    # stayed down (or up) for good, whatever the server did.
    calls = []

    def check() -> str | None:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RuntimeError("mapping check blew up")
        return None

    from vllm_llmd.devtools.server import free_port

    client = SharedTierClient(
        f"tcp://127.0.0.1:{free_port()}", 0.2, 0.1, check=check, name="hb-check"
    )
    try:
        deadline = time.monotonic() + 10
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(calls) >= 3 and client._thread.is_alive()
        assert "mapping check blew up" in caplog.text
    finally:
        client.close()
