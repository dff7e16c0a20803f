"""The worker half's step hook never raises: vLLM does not guard `start_load_kv`, and an
exception there kills the engine core (every request of the instance). Driven on CPU with the
real worker class; no KV cache is needed for these paths."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from types import SimpleNamespace

import msgspec
import pytest
from factories import make_fingerprint, make_scheduler

from vllm_llmd.connector.config import LLMDConnectorConfig
from vllm_llmd.connector.metadata import (
    LLMDConnectorMetadata,
    OffloadLoadSpec,
    ReleaseSpec,
    SendSpec,
)
from vllm_llmd.connector.worker import LLMDConnectorWorker
from vllm_llmd.devtools.server import free_port

FINGERPRINT = make_fingerprint(tensor_parallel_size=2)


@pytest.fixture
def make_worker():
    workers = []

    def make(
        tp_rank: int, tp_size: int = 2, is_producer: bool = False, **config_keys
    ) -> LLMDConnectorWorker:
        fingerprint = msgspec.structs.replace(FINGERPRINT, tensor_parallel_size=tp_size)
        config = LLMDConnectorConfig(transfer_timeout_s=0.5, **config_keys)
        worker = LLMDConnectorWorker(config, fingerprint, tp_rank, is_producer=is_producer)
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        worker.shutdown()


def test_release_with_fewer_ports_than_ranks_does_not_raise(make_worker):
    # Prefill TP 1, decode TP 2: rank 1 used to index ports[1] and kill the engine core.
    worker = make_worker(tp_rank=1)
    release = ReleaseSpec("127.0.0.1", (free_port(),), "t" * 32, "unequal TP")
    worker.start_load_kv(LLMDConnectorMetadata(releases=[release]))
    assert worker._release_endpoints(release) == []
    assert make_worker(tp_rank=0)._release_endpoints(release) == [
        f"tcp://127.0.0.1:{release.ports[0]}"
    ]


def test_every_prefill_rank_is_released_once_whatever_the_tp_sizes(make_worker):
    ports = (5001, 5002, 5003)  # prefill TP 3, decode TP 2
    release = ReleaseSpec("h", ports, "t" * 32, "r")
    endpoints = [make_worker(rank)._release_endpoints(release) for rank in (0, 1)]
    assert endpoints == [["tcp://h:5001", "tcp://h:5003"], ["tcp://h:5002"]]


def test_a_load_that_cannot_start_fails_its_request_instead_of_raising(make_worker):
    worker = make_worker(tp_rank=0, tp_size=1)  # no offload tier: the load cannot start
    load = OffloadLoadSpec("req-1", block_ids=(1, 2), slots=(0, 1))
    worker.start_load_kv(LLMDConnectorMetadata(offload_loads=[load]))
    assert worker.get_finished(set()) == (set(), {"req-1"}, {"req-1"})


def test_the_prefill_worker_reports_the_blocks_it_holds_for_decodes_when_they_change():
    config = LLMDConnectorConfig(transfer_timeout_s=0.5)
    worker = LLMDConnectorWorker(config, FINGERPRINT, 0, is_producer=True)
    try:
        assert "pd_held_blocks" not in worker.take_stats().data  # 0, as it started
        worker.registry.add("r", "t" * 32, [4, 5, 6])
        assert worker.take_stats().data["pd_held_blocks"] == 3
        assert "pd_held_blocks" not in worker.take_stats().data  # unchanged: not resent
        worker.registry.release("t" * 32, success=True)
        worker.registry.take_finished()  # vLLM frees them: nothing is held any more
        assert worker.take_stats().data["pd_held_blocks"] == 0
    finally:
        worker.shutdown()


IDLE = LLMDConnectorMetadata(idle_step=True)


def _timed(call):
    start = time.monotonic()
    result = call()
    return result, time.monotonic() - start


def _loading(worker: LLMDConnectorWorker, request_id: str = "req") -> Future:
    """A load in flight (it stands in for a pull: no KV cache here)."""
    load: Future = Future()
    worker._track_load(request_id, load)
    return load


def test_an_idle_step_waits_for_a_load_and_reports_it_the_moment_it_ends(make_worker):
    """vLLM busy-loops while a request waits only for its KV: a step that computed nothing
    waits (up to idle_wait_ms) for the load instead, and reports it the moment it ends."""
    worker = make_worker(0, 1, idle_wait_ms=5000)
    load = _loading(worker)
    worker.start_load_kv(IDLE)
    threading.Timer(0.2, load.set_result, args=(None,)).start()
    finished, took = _timed(lambda: worker.get_finished(set()))
    assert finished == (set(), {"req"}, set())
    assert 0.15 < took < 2.0  # woken by the load, not the 5 s timeout
    worker.start_load_kv(IDLE)  # nothing in flight: no wait
    assert _timed(lambda: worker.get_finished(set()))[1] < 0.1


def test_an_idle_wait_ends_after_idle_wait_ms_and_never_without_an_idle_step(make_worker):
    worker = make_worker(0, 1, idle_wait_ms=300)
    load = _loading(worker)
    worker.start_load_kv(LLMDConnectorMetadata())  # a step that computed tokens
    finished, took = _timed(lambda: worker.get_finished(set()))
    assert finished == (set(), set(), set()) and took < 0.1
    worker.start_load_kv(IDLE)
    finished, took = _timed(lambda: worker.get_finished(set()))
    assert finished == (set(), set(), set()) and 0.25 < took < 2.0
    load.set_result(None)
    off = make_worker(0, 1, idle_wait_ms=0)
    _loading(off)
    off.start_load_kv(IDLE)
    assert _timed(lambda: off.get_finished(set()))[1] < 0.1


def test_a_prefill_holding_blocks_for_a_pull_does_not_wait_for_the_release(make_worker):
    """Waking the prefill's engine on a release delayed the release's answer over TLS
    (benchmarks/README.md): an idle prefill step returns at once."""
    worker = make_worker(0, 1, is_producer=True, idle_wait_ms=5000)
    worker.start_load_kv(LLMDConnectorMetadata(sends=[SendSpec("req", "t" * 32, (1, 2))]))
    assert worker.get_finished({"req"}) == (set(), set(), set())
    worker.start_load_kv(IDLE)
    finished, took = _timed(lambda: worker.get_finished(set()))
    assert finished == (set(), set(), set()) and took < 0.1


def test_a_step_is_idle_when_vllm_scheduled_no_tokens():
    scheduler = make_scheduler()
    scheduled = SimpleNamespace(kv_connector_block_state=None, num_scheduled_tokens={"r": 1})
    nothing = SimpleNamespace(kv_connector_block_state=None, num_scheduled_tokens={})
    assert not scheduler.build_connector_meta(scheduled).idle_step
    assert scheduler.build_connector_meta(nothing).idle_step
