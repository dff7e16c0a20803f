"""`EventIngestor` when a pod's stream or the subscriber itself misbehaves: real ZMQ publishers
(an XPUB, which tells the test when the ingestor's subscription arrived) and the real ingest
thread.

- a batch that does not decode (msgpack nested past msgspec's depth guard) loses only itself:
  the good batches read in the same poll are applied, the bad one is counted as a gap;
- a pod whose every poll fails is logged with its name and traceback, polled again only after
  a growing backoff (not at the ingest loop's 100 Hz), and the other pods' events go on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import msgspec
import pytest
import zmq
from router_harness import wait_for

from vllm_llmd.events.wire import encode_seq
from vllm_llmd.router.index import InMemoryIndex, PrefixHit
from vllm_llmd.router.ingest import EventIngestor

DEEP_PAYLOAD = b"\x91" * 200_000 + b"\xc0"


def stored_payload(*hashes: int) -> bytes:
    """A KVEventBatch (array form) with one BlockStored on the GPU."""
    event = ["BlockStored", list(hashes), None, list(range(16 * len(hashes))), 16, None]
    return msgspec.msgpack.encode([time.time(), [event], 0])


@pytest.fixture
def xpubs() -> Iterator[Callable[[], tuple[zmq.Socket, str]]]:
    sockets: list[zmq.Socket] = []

    def start() -> tuple[zmq.Socket, str]:
        socket = zmq.Context.instance().socket(zmq.XPUB)
        socket.setsockopt(zmq.LINGER, 0)
        socket.bind("tcp://127.0.0.1:*")
        sockets.append(socket)
        return socket, socket.getsockopt_string(zmq.LAST_ENDPOINT)

    yield start
    for socket in sockets:
        socket.close(linger=0)


def wait_subscribed(xpub: zmq.Socket) -> None:
    assert xpub.poll(10_000), "the ingestor never subscribed"
    assert xpub.recv().startswith(b"\x01")


@pytest.fixture
def ingestor() -> Iterator[EventIngestor]:
    with EventIngestor(InMemoryIndex(max_entries=1000)) as ingestor:
        yield ingestor


def test_an_undecodable_batch_loses_only_itself(xpubs, ingestor):
    socket, endpoint = xpubs()
    ingestor.add_pod("pod-a", endpoint)
    wait_subscribed(socket)
    # one send: the three arrive together and the ingest thread reads them in one poll
    for seq, payload in enumerate([stored_payload(1), DEEP_PAYLOAD, stored_payload(3)]):
        socket.send_multipart([b"", encode_seq(seq), payload])
    wait_for(lambda: bool(ingestor.index.lookup_prefix([3])))
    assert ingestor.index.lookup_prefix([1]) == {"pod-a": PrefixHit(1, ("GPU",))}
    stats = ingestor.stats()["pod-a"]
    assert (stats["num_batches"], stats["num_malformed"], stats["num_gaps"]) == (2, 1, 1)
    assert stats["num_poll_errors"] == 0


def test_a_failing_pod_is_logged_with_its_traceback_backed_off_and_spares_the_others(
    xpubs, ingestor, caplog
):
    bad_socket, bad_endpoint = xpubs()
    good_socket, good_endpoint = xpubs()
    ingestor.add_pod("pod-bad", bad_endpoint)
    ingestor.add_pod("pod-good", good_endpoint)
    wait_subscribed(bad_socket)
    wait_subscribed(good_socket)
    # Stands in for a transport failure inside the subscriber (its socket gone under it): from
    # now on every poll of pod-bad raises.
    with ingestor._pods["pod-bad"].lock:
        ingestor._pods["pod-bad"].subscriber._live.close()
    with caplog.at_level(logging.WARNING, logger="vllm_llmd.router.ingest"):
        time.sleep(1.5)
        good_socket.send_multipart([b"", encode_seq(0), stored_payload(7)])
        wait_for(lambda: bool(ingestor.index.lookup_prefix([7])))
    errors = ingestor.stats()["pod-bad"]["num_poll_errors"]
    # backoff 0.1, 0.2, 0.4, 0.8 s...: a handful of tries, not one per 10 ms round
    assert 1 <= errors <= 8, errors
    logged = [r for r in caplog.records if "pod-bad" in r.getMessage()]
    assert logged and logged[0].exc_info is not None, "no traceback logged"
    assert "ZMQError" in caplog.text
    assert ingestor._thread.is_alive()
