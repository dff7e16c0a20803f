"""The index's write path: `EventIngestor` fed by real publishers.

- vLLM's own `ZmqEventPublisher` in this process: stored / removed / cleared events (with
  duplicates, every tier, a medium the index refuses), history through replay, an engine
  restart (Reset), several pods and `remove_pod`;
- `apply_update` alone for what a publisher cannot be made to do on cue (a Gap, a failing
  index);
- end to end: a real `vllm serve` (tiny model, LLMDConnector with a host tier, events on):
  after a few prompts the index holds each prompt's full blocks on that pod, best tier GPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import zmq
from conftest import llmd_host_tier
from factories import vllm_block_stored
from router_harness import wait_for
from tokenizers import Tokenizer
from vllm.distributed import kv_events as vllm_events

from vllm_llmd.devtools.client import complete
from vllm_llmd.devtools.model_maker import sample_text
from vllm_llmd.devtools.server import VLLMServerConfig, event_endpoints, free_port, kv_events_config
from vllm_llmd.events.updates import Gap, Reset
from vllm_llmd.hashing import PrefixHasher
from vllm_llmd.router.event_apply import PodStats, apply_update
from vllm_llmd.router.index import InMemoryIndex, PrefixHit
from vllm_llmd.router.ingest import EventIngestor

GPU, CPU, STORAGE = "GPU", "CPU", "STORAGE"


def stored(hashes: list[int], medium: str | None = GPU) -> vllm_events.BlockStored:
    return vllm_block_stored(hashes, medium)


def removed(hashes: list[int], medium: str = GPU) -> vllm_events.BlockRemoved:
    return vllm_events.BlockRemoved(block_hashes=hashes, medium=medium)


def publish(publisher: vllm_events.ZmqEventPublisher, *events) -> None:
    batch = vllm_events.KVEventBatch(ts=time.time(), events=list(events), data_parallel_rank=0)
    publisher.publish(batch)


def hit(*tiers: str) -> PrefixHit:
    return PrefixHit(len(tiers), tiers)


@pytest.fixture
def publishers() -> Iterator[Callable[..., tuple]]:
    """vLLM publishers in this process: start(ports=None) -> (publisher, endpoint, replay)."""
    started: list[vllm_events.ZmqEventPublisher] = []

    def start(ports: tuple[int, int] | None = None):
        port, replay_port = ports or (free_port(), free_port())
        deadline = time.monotonic() + 10
        while True:
            try:
                publisher = vllm_events.ZmqEventPublisher(
                    0,
                    endpoint=f"tcp://*:{port}",
                    replay_endpoint=f"tcp://*:{replay_port}",
                    topic="kv",
                )
                break
            except zmq.ZMQError:  # a previous publisher's socket is still closing
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        started.append(publisher)
        return publisher, f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{replay_port}"

    yield start
    for publisher in started:
        if publisher._running:
            publisher.shutdown()


@pytest.fixture
def ingestor() -> Iterator[EventIngestor]:
    with EventIngestor(InMemoryIndex(max_entries=1000)) as ingestor:
        yield ingestor


def batches_seen(ingestor: EventIngestor, pod: str) -> int:
    return ingestor.stats()[pod]["num_batches"]


def test_events_are_applied_in_order_with_history_from_replay(publishers, ingestor):
    publisher, endpoint, replay = publishers()
    publish(publisher, stored([10, 11, 12]))
    publish(publisher, stored([10, 11, 12]))  # a duplicate: a second request, same prefix
    publish(publisher, removed([12]))
    time.sleep(0.3)  # the publisher thread sends them (into its replay buffer)

    ingestor.add_pod("pod-a", endpoint, replay, topic="kv")  # starts late: replay has them
    wait_for(lambda: batches_seen(ingestor, "pod-a") == 3)
    index = ingestor.index
    assert index.lookup_prefix([10, 11, 12]) == {"pod-a": hit(GPU, GPU, GPU)}
    time.sleep(0.3)  # the SUB socket has joined: what follows comes live

    publish(publisher, removed([12]), stored([12, 13], medium=CPU), stored([14], medium=None))
    wait_for(lambda: batches_seen(ingestor, "pod-a") == 4)
    # 12's last GPU reference went; its CPU copy serves; no medium means the engine's cache
    assert index.lookup_prefix([10, 11, 12, 13, 14]) == {"pod-a": hit(GPU, GPU, CPU, CPU, GPU)}

    publish(publisher, stored([15], medium="HBM"), removed([99], medium=STORAGE))
    publish(publisher, vllm_events.AllBlocksCleared())
    wait_for(lambda: batches_seen(ingestor, "pod-a") == 6)
    assert index.lookup_prefix([10]) == {}
    stats = ingestor.stats()["pod-a"]
    assert stats["num_events"] == 9
    assert stats["num_bad_events"] == 1  # the medium no index tier has: counted, skipped
    assert stats["num_gaps"] == stats["num_resets"] == stats["num_index_errors"] == 0
    assert index.stats().num_unknown_removals == 1
    assert 0 <= stats["lag_s"] < 5 and stats["last_event_ts"] <= stats["last_received_at"]


def test_engine_restart_clears_the_pod(publishers, ingestor):
    publisher, endpoint, replay = publishers()
    publish(publisher, stored([1, 2, 3]))
    time.sleep(0.3)
    ingestor.add_pod("pod-a", endpoint, replay, topic="kv")
    wait_for(lambda: bool(ingestor.index.lookup_prefix([1])))

    ports = (int(endpoint.rsplit(":", 1)[1]), int(replay.rsplit(":", 1)[1]))
    publisher.shutdown()  # a new engine on the same ports: seq starts at 0 again
    restarted, _, _ = publishers(ports)
    deadline = time.monotonic() + 15
    while not ingestor.index.lookup_prefix([1000]):  # until the SUB reconnected
        assert time.monotonic() < deadline, ingestor.stats()
        publish(restarted, stored([1000]))
        time.sleep(0.3)
    assert ingestor.index.lookup_prefix([1]) == {}  # the old engine's blocks are gone
    assert ingestor.stats()["pod-a"]["num_resets"] == 1


def test_pods_are_followed_apart_and_removed(publishers, ingestor):
    (pub_a, endpoint_a, replay_a), (pub_b, endpoint_b, replay_b) = publishers(), publishers()
    publish(pub_a, stored([1, 2]))
    publish(pub_b, stored([1], medium=CPU))
    time.sleep(0.3)
    ingestor.add_pod("a", endpoint_a, replay_a, topic="kv")
    ingestor.add_pod("b", endpoint_b, replay_b, topic="kv")
    index = ingestor.index
    wait_for(lambda: len(index.lookup_prefix([1, 2])) == 2)
    assert index.lookup_prefix([1, 2]) == {"a": hit(GPU, GPU), "b": hit(CPU)}

    with pytest.raises(ValueError, match="already followed"):
        ingestor.add_pod("a", endpoint_a, replay_a, topic="kv")
    with pytest.raises(ValueError, match="bind address"):
        ingestor.add_pod("c", "tcp://*:5557")

    ingestor.remove_pod("a")
    ingestor.remove_pod("a")  # unknown now: a no-op
    assert index.lookup_prefix([1, 2]) == {"b": hit(CPU)}
    assert ingestor.pods() == ["b"] and list(ingestor.stats()) == ["b"]

    ingestor.close()
    with pytest.raises(RuntimeError, match="closed"):
        ingestor.add_pod("a", endpoint_a, replay_a, topic="kv")
    assert index.lookup_prefix([1]) == {"b": hit(CPU)}  # closing keeps the index


def test_a_dead_pod_does_not_hold_up_the_others(publishers, ingestor):
    """Each replay from a pod whose replay socket is gone waits out its timeout (2 s): that wait
    happens off the thread that applies every pod's events, whose other pods go on."""
    publisher, endpoint, replay = publishers()
    ingestor.add_pod("live", endpoint, replay, topic="kv")
    time.sleep(0.3)  # its SUB has joined
    publish(publisher, stored([1]))
    wait_for(lambda: bool(ingestor.index.lookup_prefix([1])))

    # Live sockets that take the subscription (the replay is asked for only then) and replay
    # sockets where nothing listens: every replay request goes unanswered.
    dead = [zmq.Context.instance().socket(zmq.PUB) for _ in range(2)]
    try:
        for name, pub in zip(("dead-a", "dead-b"), dead, strict=True):
            pub.setsockopt(zmq.LINGER, 0)
            pub.bind("tcp://127.0.0.1:*")
            live = pub.getsockopt_string(zmq.LAST_ENDPOINT)
            ingestor.add_pod(name, live, f"tcp://127.0.0.1:{free_port()}")
        time.sleep(0.1)  # the ingest thread has taken up the dead pods (their first replay)
        started = time.monotonic()
        publish(publisher, stored([2]))
        wait_for(lambda: ingestor.index.lookup_prefix([1, 2]) == {"live": hit(GPU, GPU)})
        assert time.monotonic() - started < 1.0  # not the 2 x 2 s the dead pods' replays take

        # The dead pods' replays did run, and failed (counted); removing one waits for it.
        wait_for(
            lambda: all(
                ingestor.stats()[p]["num_replay_failures"] == 1 for p in ("dead-a", "dead-b")
            )
        )
        ingestor.remove_pod("dead-a")
        assert ingestor.pods() == ["live", "dead-b"]
        assert ingestor.stats()["live"]["num_replay_failures"] == 0
    finally:
        for pub in dead:
            pub.close(linger=0)


def test_a_pod_whose_publisher_never_answers_is_asked_for_no_replay(ingestor):
    """Until its live socket is subscribed a pod's replay is not asked for: a pod whose
    publisher is not (yet) there costs no replay wait, and none fails."""
    ingestor.add_pod("absent", f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}")
    time.sleep(3.0)  # longer than a replay's timeout (2 s): one asked for would have failed
    assert ingestor.stats()["absent"]["num_replay_failures"] == 0


def test_gaps_resets_and_index_failures_are_counted():
    index = InMemoryIndex(max_entries=100)
    stats = PodStats()
    index.add("a", GPU, [1])
    apply_update(index, "a", Gap("a", 5, 7), stats)
    assert (stats.num_gaps, stats.num_lost_batches) == (1, 3)
    assert index.lookup_prefix([1]) == {"a": hit(GPU)}  # a gap keeps what the pod had
    apply_update(index, "a", Reset("a", 0), stats)
    assert stats.num_resets == 1 and index.lookup_prefix([1]) == {}

    class BrokenIndex(InMemoryIndex):
        def clear_pod(self, pod: str) -> None:
            raise ConnectionError("redis went away")

    apply_update(BrokenIndex(), "a", Reset("a", 0), stats)  # logged and counted, not raised
    assert stats.num_index_errors == 1


# ---- end to end: a real vLLM server --------------------------------------------------------------

BLOCK = 128  # vLLM's default block size on CPU


@pytest.fixture(scope="module")
def events_server(tiny_model, vllm_servers):
    config = VLLMServerConfig(
        model=tiny_model,
        max_model_len=2048,
        kv_transfer_config=llmd_host_tier(),
        kv_events_config=kv_events_config(),
    )
    server = vllm_servers.shared("router-ingest", config)
    return (server, *event_endpoints(config))


@pytest.mark.server
def test_index_follows_a_real_server(events_server, tiny_model, ingestor):
    server, endpoint, replay = events_server
    ingestor.add_pod("pod-0", endpoint, replay, topic="kv")
    tokenizer = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    hasher = PrefixHasher(BLOCK)
    prompts = [
        tokenizer.encode(sample_text(500, seed=700 + i)).ids[: 3 * BLOCK + 40] for i in range(3)
    ]
    for prompt in prompts:
        complete(server.url, server.model_name, prompt, max_tokens=2)

    index = ingestor.index
    for prompt in prompts:
        hashes = hasher.event_hashes(prompt)
        assert len(hashes) == 3
        wait_for(lambda h=hashes: index.lookup_prefix(h).get("pod-0") == hit(GPU, GPU, GPU), 30)
    # a prompt the server never saw shares no block
    assert index.lookup_prefix(hasher.event_hashes(list(reversed(prompts[0])))) == {}

    # The host tier stored the prompts' blocks too: once the GPU copy goes (as an eviction
    # would do), the best tier left is CPU.
    first = hasher.event_hashes(prompts[0])
    index.remove("pod-0", GPU, first)
    wait_for(lambda: index.lookup_prefix(first).get("pod-0") == hit(CPU, CPU, CPU), 30)
    stats = ingestor.stats()["pod-0"]
    assert stats["num_batches"] > 0 and stats["num_bad_events"] == stats["num_malformed"] == 0
    assert stats["num_gaps"] == stats["num_resets"] == 0
