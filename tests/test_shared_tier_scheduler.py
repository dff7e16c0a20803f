"""The shared tier without LMCache servers: the scheduler half's bookkeeping with a fake
LMCache client (what it looks up, loads, stores, frees and announces), config checks, and the
client's heartbeat against a port nobody serves. The fake stands in for the server only: the
scheduler half, vLLM's `Request` and its block hasher are real."""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

import pytest
from factories import BLOCK, make_request, make_scheduler
from shared_tier_harness import CHUNK, needs_lmcache

from vllm_llmd.connector.config import LLMDConnectorConfig
from vllm_llmd.shared_tier.client import SharedTierClient, import_lmcache
from vllm_llmd.shared_tier.planner import SharedTierPlanner


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
    client = FakeLMCacheClient(hit_chunks)
    planner = SharedTierPlanner(client, "m", 1, BLOCK, CHUNK)
    scheduler = make_scheduler(
        engine_id="e", producer=True, consumer=True, shared=planner, publish_events=publish_events
    )
    return scheduler, planner, client


def _vllm_request(num_tokens: int, request_id: str = "req-s"):
    return make_request(request_id, range(num_tokens), max_tokens=1)


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
    from vllm_llmd.job_tally import JobKind, JobTally

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
