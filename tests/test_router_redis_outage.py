"""The Redis backends (`RedisIndex`, `RedisSharedView`) when Redis fails: a real redis-server of
the test's own (loopback, free port, no persistence) that is paused with SIGSTOP (the kernel
still accepts connections, nothing ever answers: without a read timeout a call hangs) or
stopped for good. Every call must return within its timeouts and raise `IndexUnavailable`, the
one error the proxy catches to route by load alone; the ingestor counts what it could not
apply and logs it at most every 10 s; everything works again once Redis is back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import msgspec
import pytest
import zmq
from factories import vllm_stored_batch
from router_harness import wait_for

from vllm_llmd.devtools.server import free_port
from vllm_llmd.events.wire import encode_seq
from vllm_llmd.router.ingest import EventIngestor
from vllm_llmd.router.redis_client import IndexUnavailable
from vllm_llmd.router.shared_view import RedisSharedView

redis = pytest.importorskip("redis")
from vllm_llmd.router.redis_index import RedisIndex  # noqa: E402 (needs the redis client)

TIMEOUTS = {"socket_timeout_s": 0.3, "connect_timeout_s": 0.3, "retries": 1}
# two tries of 0.3 s, a short backoff, and slack for a loaded test machine
WITHIN_S = 1.5


def backends(url: str) -> tuple[RedisIndex, RedisSharedView]:
    return RedisIndex(url, **TIMEOUTS), RedisSharedView(url, **TIMEOUTS)


def calls(index: RedisIndex, view: RedisSharedView) -> dict[str, Callable[[], object]]:
    """One of every backend call the router makes."""
    return {
        "index.add": lambda: index.add("pod", "GPU", [1, 2]),
        "index.remove": lambda: index.remove("pod", "GPU", [2]),
        "index.lookup_prefix": lambda: index.lookup_prefix([1, 2]),
        "index.clear_pod": lambda: index.clear_pod("other"),
        "index.stats": index.stats,
        "view.mark": lambda: view.mark("pod", [5]),
        "view.forget": lambda: view.forget("pod", [5]),
        "view.run_length": lambda: view.run_length([5, 6]),
        "view.remove_member": lambda: view.remove_member("other"),
    }


def assert_each_fails_in_time(index: RedisIndex, view: RedisSharedView) -> None:
    for name, call in calls(index, view).items():
        started = time.monotonic()
        with pytest.raises(IndexUnavailable, match=r"Redis at 127\.0\.0\.1:\d+/0 failed"):
            call()
        assert time.monotonic() - started < WITHIN_S, f"{name} took too long"
    view._members_read_at = float("-inf")  # members() is cached for a second: ask Redis
    with pytest.raises(IndexUnavailable):
        view.members()


def test_a_paused_redis_costs_one_bounded_wait_per_call(redis_server):
    index, view = backends(redis_server.url)
    for call in calls(index, view).values():
        call()  # all fine while Redis answers
    redis_server.pause()
    try:
        assert_each_fails_in_time(index, view)
    finally:
        redis_server.resume()
    # back: the same objects work again
    index.add("pod", "GPU", [1])
    assert index.lookup_prefix([1])["pod"].num_blocks == 1
    view.mark("pod", [9])
    assert view.run_length([9]) == 1
    index.close()
    view.close()


def test_a_stopped_redis_fails_fast_with_index_unavailable(redis_server):
    index, view = backends(redis_server.url)
    redis_server.stop()
    assert_each_fails_in_time(index, view)
    with pytest.raises(IndexUnavailable, match="cannot reach Redis"):
        RedisIndex(redis_server.url, **TIMEOUTS)
    assert issubclass(IndexUnavailable, ConnectionError)  # what callers caught before


@pytest.mark.parametrize(
    "bad", [{"socket_timeout_s": 0}, {"connect_timeout_s": -1.0}, {"retries": -1}]
)
def test_bounds_are_checked(bad):
    with pytest.raises(ValueError, match="Redis"):
        RedisSharedView("redis://127.0.0.1:1/0", **bad)


def test_ingest_counts_and_rate_limits_what_a_paused_redis_loses(redis_server, caplog):
    index = RedisIndex(redis_server.url, **TIMEOUTS)
    socket = zmq.Context.instance().socket(zmq.XPUB)
    socket.setsockopt(zmq.LINGER, 0)
    socket.bind("tcp://127.0.0.1:*")
    endpoint = socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def send(seq: int, block_hash: int) -> None:
        event = ["BlockStored", [block_hash], None, list(range(16)), 16, None]
        payload = msgspec.msgpack.encode([time.time(), [event], 0])
        socket.send_multipart([b"", encode_seq(seq), payload])

    try:
        with EventIngestor(index) as ingestor:
            ingestor.add_pod("pod-r", endpoint)
            assert socket.poll(10_000) and socket.recv().startswith(b"\x01")
            send(0, 100)
            wait_for(lambda: bool(index.lookup_prefix([100])))
            redis_server.pause()
            with caplog.at_level(logging.WARNING, logger="vllm_llmd.router.ingest"):
                for seq in range(1, 4):
                    send(seq, 100 + seq)
                wait_for(lambda: ingestor.stats()["pod-r"]["num_index_errors"] == 3)
            redis_server.resume()
            logged = [r for r in caplog.records if "pod-r" in r.getMessage()]
            assert len(logged) == 1, [r.getMessage() for r in logged]  # not one per event
            assert "IndexUnavailable" in logged[0].getMessage()
            send(4, 200)
            wait_for(lambda: bool(index.lookup_prefix([200])))  # applied again once it is back
    finally:
        socket.close(linger=0)
        index.close()


def test_following_and_dropping_a_pod_while_redis_is_down(redis_server, caplog):
    """remove_pod (run off the event loop when a pod leaves) logs what it could not drop;
    add_pod raises IndexUnavailable (the registry tries again next poll) and keeps nothing."""
    index = RedisIndex(redis_server.url, **TIMEOUTS)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with EventIngestor(index) as ingestor:
        ingestor.add_pod("pod-x", endpoint)
        redis_server.stop()
        with caplog.at_level(logging.WARNING, logger="vllm_llmd.router.ingest"):
            ingestor.remove_pod("pod-x")
        assert ingestor.pods() == []
        assert "pod-x: its index entries could not be dropped" in caplog.text
        with pytest.raises(IndexUnavailable):
            ingestor.add_pod("pod-x", endpoint)
        assert ingestor.pods() == []
    index.close()


def _vllm_publisher() -> tuple[object, str, str]:
    """vLLM's own publisher with a replay buffer: (publisher, endpoint, replay endpoint)."""
    from vllm.distributed import kv_events as vllm_events

    port, replay = free_port(), free_port()
    publisher = vllm_events.ZmqEventPublisher(
        0, endpoint=f"tcp://*:{port}", replay_endpoint=f"tcp://*:{replay}", topic="kv"
    )
    return publisher, f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{replay}"


def _publish_stored(publisher, hashes: list[int]) -> None:
    publisher.publish(vllm_stored_batch(hashes))


def test_what_redis_lost_is_rebuilt_from_the_pods_replay_buffers(redis_server):
    """A Redis restarted empty, and one that missed events while it hung: once it answers, the
    pod's entries are rebuilt from its publisher's replay buffer, without a new event."""
    index = RedisIndex(redis_server.url, **TIMEOUTS)
    publisher, endpoint, replay = _vllm_publisher()

    def held(hashes: list[int]) -> int:
        hit = index.lookup_prefix(hashes).get("pod")
        return 0 if hit is None else hit.num_blocks

    try:
        with EventIngestor(index, index_check_s=0.2) as ingestor:
            ingestor.add_pod("pod", endpoint, replay, topic="kv")
            _publish_stored(publisher, [1, 2, 3])
            wait_for(lambda: held([1, 2, 3]) == 3)

            redis_server.restart()  # empty: every entry is gone
            wait_for(lambda: held([1, 2, 3]) == 3, 10)
            assert ingestor.stats()["pod"]["num_resyncs"] == 1

            redis_server.pause()  # this event cannot be applied
            _publish_stored(publisher, [7])
            wait_for(lambda: ingestor.stats()["pod"]["num_index_errors"] >= 1, 10)
            redis_server.resume()
            # (the hung call may still land once Redis wakes: the rebuild is what is checked)
            wait_for(lambda: ingestor.stats()["pod"]["num_resyncs"] == 2, 10)
            wait_for(lambda: held([7]) == 1 and held([1, 2, 3]) == 3, 10)
    finally:
        publisher.shutdown()
        index.close()
