"""Our KV-event decoder, subscriber and `watch` CLI against the real thing.

- decoder: batches encoded with vLLM's own structs and msgspec encoder, plus hand-encoded older
  (array-form) and newer (unknown fields) batches, and malformed ones;
- subscriber: vLLM's real ZmqEventPublisher in this process: late start, lost messages refilled
  by replay, gaps without replay, an engine restart;
- end to end: a real `vllm serve` with KV events; every published block hash is recomputed from
  the request's token ids with vllm_llmd.hashing, and `watch` runs against it as a subprocess.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import msgspec
import pytest
import zmq
from events_harness import poll_until
from vllm.distributed import kv_events as vllm_events

from vllm_llmd.devtools.client import complete, completion_token_ids, post_json
from vllm_llmd.devtools.model_maker import sample_text
from vllm_llmd.devtools.server import VLLMServerConfig, free_port
from vllm_llmd.events import __main__ as cli
from vllm_llmd.events.decoder import MalformedBatchError, decode_batch
from vllm_llmd.events.model import AllBlocksCleared, BlockRemoved, BlockStored
from vllm_llmd.events.subscriber import Subscriber
from vllm_llmd.events.transport import TRANSPORTS
from vllm_llmd.events.updates import Gap, ReceivedBatch, Reset, Update
from vllm_llmd.events.wire import (
    END_SEQ,
    FrameError,
    RawMessage,
    encode_seq,
    parse_live,
    parse_replay,
)
from vllm_llmd.hashing import PrefixHasher, short_hash, to_event_hash

ENCODER = msgspec.msgpack.Encoder()  # what ZmqEventPublisher encodes with


def vllm_stored(first_hash: int, num_blocks: int = 1, block_size: int = 16, **fields):
    fields.setdefault("parent_block_hash", None)
    fields.setdefault("lora_id", None)
    fields.setdefault("medium", vllm_events.MEDIUM_GPU)
    fields.setdefault("lora_name", None)
    return vllm_events.BlockStored(
        block_hashes=[first_hash + i for i in range(num_blocks)],
        token_ids=list(range(num_blocks * block_size)),
        block_size=block_size,
        **fields,
    )


def vllm_batch(*events, ts: float = 1.5) -> vllm_events.KVEventBatch:
    return vllm_events.KVEventBatch(ts=ts, events=list(events), data_parallel_rank=0)


def assert_same_stored(ours: BlockStored, theirs: vllm_events.BlockStored) -> None:
    to_int = [h if isinstance(h, int) else to_event_hash(h) for h in theirs.block_hashes]
    assert list(ours.block_hashes) == to_int
    parent = theirs.parent_block_hash
    assert ours.parent_block_hash == (
        parent if parent is None or isinstance(parent, int) else to_event_hash(parent)
    )
    assert list(ours.token_ids) == theirs.token_ids
    # every other field vLLM declares, compared as is: a field vLLM adds fails here first
    compared_above = {"block_hashes", "parent_block_hash", "token_ids", "extra_keys"}
    for name in set(type(theirs).__struct_fields__) - compared_above:
        assert getattr(ours, name) == getattr(theirs, name), name
    expected_keys = None if theirs.extra_keys is None else tuple(theirs.extra_keys)
    assert ours.extra_keys == expected_keys


# ---- decoder --------------------------------------------------------------------------------


def test_decodes_vllm_encoded_batches():
    digest = PrefixHasher(16).block_hashes(list(range(16)))[0]
    stored = [
        vllm_stored(3262291359910021016, 2),
        vllm_stored(
            7,
            3,
            parent_block_hash=6,
            lora_id=3,
            lora_name="sql",
            extra_keys=[("sql", "salt"), ("sql",), None],
            group_idx=1,
            kv_cache_spec_kind="sliding_window",
            kv_cache_spec_sliding_window=128,
            locality="LOCAL",
            ownership="cpu-tier",
            session_id="s1",
            medium=vllm_events.MEDIUM_CPU,
        ),
        # VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0: raw digests on the wire
        vllm_events.BlockStored(
            block_hashes=[digest],
            parent_block_hash=digest,
            token_ids=list(range(16)),
            block_size=16,
            lora_id=None,
            medium=vllm_events.MEDIUM_STORAGE,
            lora_name=None,
        ),
    ]
    removed = vllm_events.BlockRemoved(block_hashes=[7, 8], medium="CPU", group_idx=1)
    payload = ENCODER.encode(vllm_batch(*stored, removed, vllm_events.AllBlocksCleared(), ts=12.25))

    batch = decode_batch(payload)
    assert (batch.ts, batch.data_parallel_rank) == (12.25, 0)
    assert (batch.num_malformed, batch.num_unknown) == (0, 0)
    assert len(batch.events) == 5
    for ours, theirs in zip(batch.events[:3], stored, strict=True):
        assert isinstance(ours, BlockStored)
        assert_same_stored(ours, theirs)
    assert batch.events[2].block_hashes == (to_event_hash(digest),)
    assert batch.events[3] == BlockRemoved(block_hashes=(7, 8), medium="CPU", group_idx=1)
    assert batch.events[4] == AllBlocksCleared()


def test_wire_form_is_what_the_reference_says():
    # guards the test itself: vLLM 0.32 sends tagged maps inside a positional batch
    raw = msgspec.msgpack.decode(ENCODER.encode(vllm_batch(vllm_stored(1))))
    assert isinstance(raw, list) and len(raw) == 3
    assert raw[1][0]["type"] == "BlockStored"


def test_decodes_old_array_form():
    tokens = list(range(32))
    payload = msgspec.msgpack.encode(
        [
            2.0,
            [
                ["BlockStored", [11, 12], None, tokens, 16, None, "GPU", None, [None, None], 0],
                ["BlockStored", [13], 12, tokens[:16], 16, None],  # before `medium` existed
                ["BlockRemoved", [11], "GPU"],
                ["BlockRemoved", [12]],
                ["AllBlocksCleared"],
            ],
        ]  # no dp rank: older engines omitted it
    )
    batch = decode_batch(payload)
    assert batch.data_parallel_rank is None and batch.num_malformed == 0
    first, second, removed, removed_old, cleared = batch.events
    assert first == BlockStored(
        block_hashes=(11, 12),
        parent_block_hash=None,
        token_ids=tuple(tokens),
        block_size=16,
        medium="GPU",
        extra_keys=(None, None),
        group_idx=0,
    )
    assert (second.parent_block_hash, second.medium, second.block_hashes) == (12, None, (13,))
    assert removed == BlockRemoved(block_hashes=(11,), medium="GPU")
    assert removed_old == BlockRemoved(block_hashes=(12,))
    assert cleared == AllBlocksCleared()


def test_ignores_unknown_fields_and_reads_lookahead():
    event = msgspec.msgpack.decode(ENCODER.encode(vllm_stored(5, 2)))
    event["lookahead_token_ids"] = [[100], [101]]  # vLLM 0.33
    event["a_field_from_the_future"] = {"x": [1, 2]}
    array_event = ["BlockRemoved", [5], "GPU", None, None, None, "extra", "trailing"]
    payload = msgspec.msgpack.encode([3.0, [event, array_event], 0, "extra batch field"])
    batch = decode_batch(payload)
    assert batch.num_malformed == 0
    assert batch.events[0].lookahead_token_ids == ((100,), (101,))
    assert batch.events[0].block_hashes == (5, 6)
    assert batch.events[1] == BlockRemoved(block_hashes=(5,), medium="GPU")


def test_counts_malformed_and_unknown_events_without_raising():
    good = msgspec.msgpack.decode(ENCODER.encode(vllm_stored(1)))
    missing_hashes = {k: v for k, v in good.items() if k != "block_hashes"}
    payload = msgspec.msgpack.encode(
        [
            4.0,
            [
                missing_hashes,
                {**good, "block_hashes": "not a list"},
                {**good, "block_hashes": [-1]},  # not a uint64
                {**good, "token_ids": [1.5]},
                42,
                {"no": "type"},
                {"type": "BlockUpdated", "block_hashes": [1]},  # a newer vLLM's event
                good,
            ],
            0,
        ]
    )
    batch = decode_batch(payload)
    assert (batch.num_malformed, batch.num_unknown) == (6, 1)
    assert [e.block_hashes for e in batch.events] == [(1,)]


@pytest.mark.parametrize(
    "payload",
    [b"\xc1 not msgpack", msgspec.msgpack.encode({"ts": 1}), msgspec.msgpack.encode([1.0])],
)
def test_a_payload_that_is_not_a_batch_raises(payload):
    with pytest.raises(MalformedBatchError):
        decode_batch(payload)


def test_wire_frames():
    assert parse_live([b"kv", encode_seq(7), b"p"]) == RawMessage(b"kv", 7, b"p")
    assert parse_replay([b"", b"kv", encode_seq(7), b"p"]) == RawMessage(b"kv", 7, b"p")
    assert parse_replay([b"", encode_seq(7), b"p"]) == RawMessage(b"", 7, b"p")  # older vLLM
    assert parse_replay([b"", b"", END_SEQ, b""]) is None
    assert END_SEQ == vllm_events.ZmqEventPublisher.END_SEQ
    with pytest.raises(FrameError):
        parse_live([b"kv", b"\x00", b"p"])
    with pytest.raises(FrameError):
        parse_live([b"kv", b"p"])


# ---- subscriber against vLLM's ZmqEventPublisher --------------------------------------------


@pytest.fixture(params=TRANSPORTS)
def transport(request) -> str:
    """Each subscriber test runs with pyzmq and with our ZMTP client."""
    return request.param


@pytest.fixture
def publishers() -> Iterator[Callable[..., vllm_events.ZmqEventPublisher]]:
    """Start vLLM publishers in this process (binding, retried while a port is released)."""
    started: list[vllm_events.ZmqEventPublisher] = []

    def start(port: int, replay_port: int | None, topic: str = "kv"):
        deadline = time.monotonic() + 10
        while True:
            try:
                publisher = vllm_events.ZmqEventPublisher(
                    0,
                    endpoint=f"tcp://*:{port}",
                    replay_endpoint=f"tcp://*:{replay_port}" if replay_port else None,
                    topic=topic,
                )
                break
            except zmq.ZMQError:  # the previous publisher's socket is still closing
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        started.append(publisher)
        return publisher

    yield start
    for publisher in started:
        if publisher._running:
            publisher.shutdown()


def batches(updates: list[Update]) -> list[ReceivedBatch]:
    return [u for u in updates if isinstance(u, ReceivedBatch)]


def seqs(updates: list[Update]) -> list[int]:
    return [u.seq for u in batches(updates)]


def first_hash(update: ReceivedBatch) -> int:
    return update.batch.events[0].block_hashes[0]


def publish(publisher, hashes) -> None:
    for h in hashes:
        publisher.publish(vllm_batch(vllm_stored(h), ts=time.time()))


def local_subscriber(port: int, replay_port: int, transport: str) -> Subscriber:
    """A subscriber of topic "kv" on a publisher of this process (live and replay ports)."""
    return Subscriber(
        f"tcp://127.0.0.1:{port}",
        replay_endpoint=f"tcp://127.0.0.1:{replay_port}",
        topic="kv",
        transport=transport,
    )


def test_late_subscriber_gets_history_from_replay(publishers, transport):
    port, replay_port = free_port(), free_port()
    publisher = publishers(port, replay_port)
    publish(publisher, range(100, 105))
    time.sleep(0.3)  # the publisher thread sends them

    with local_subscriber(port, replay_port, transport) as subscriber:
        history = subscriber.poll(0.2)
        assert seqs(history) == [0, 1, 2, 3, 4]
        assert all(u.replayed for u in batches(history))
        assert [first_hash(u) for u in batches(history)] == list(range(100, 105))

        publish(publisher, range(105, 110))
        live = poll_until(subscriber, lambda u: 9 in seqs(u))
        assert seqs(live) == [5, 6, 7, 8, 9]  # in order, once each (copies of replayed dropped)
        assert [first_hash(u) for u in batches(live)] == list(range(105, 110))
        assert not [u for u in history + live if isinstance(u, (Gap, Reset))]
        assert subscriber.stats.num_batches == 10
    assert subscriber.closed


def test_deferred_replay_runs_where_the_owner_says(publishers, transport):
    port, replay_port = free_port(), free_port()
    publisher = publishers(port, replay_port)
    publish(publisher, range(100, 103))
    time.sleep(0.3)
    with Subscriber(
        f"tcp://127.0.0.1:{port}",
        replay_endpoint=f"tcp://127.0.0.1:{replay_port}",
        topic="kv",
        transport=transport,
        defer_replay=True,
    ) as subscriber:
        # Polls return nothing; once the live subscription is on its way, the replay waits.
        deadline = time.monotonic() + 10
        while not subscriber.replay_pending:
            assert subscriber.poll(0.0) == [] and time.monotonic() < deadline
            time.sleep(0.01)
        assert subscriber.poll(0.0) == []
        result: list[list[Update]] = []
        worker = threading.Thread(target=lambda: result.append(subscriber.complete_replay()))
        worker.start()  # the replay socket is read on another thread, as the router does
        worker.join(10)
        assert seqs(result[0]) == [0, 1, 2] and not subscriber.replay_pending
        publish(publisher, range(103, 105))
        assert seqs(poll_until(subscriber, lambda u: 4 in seqs(u))) == [3, 4]


def test_a_batch_published_while_the_subscription_travels_is_not_missed(publishers, transport):
    """A subscriber asks for the replay buffer only once its live subscription is on its way:
    a batch published just after its first poll (a router meeting a new pod) arrives, by replay
    or live, though no later batch would show it missing. Asked earlier, the replay would find
    the buffer empty and the publisher would drop the batch for want of a subscriber."""
    for attempt in range(3):  # the batch lands at a different moment of the handshake each time
        port, replay_port = free_port(), free_port()
        publisher = publishers(port, replay_port)
        with local_subscriber(port, replay_port, transport) as subscriber:
            updates = subscriber.poll(0.0)  # the first poll, as the router's ingest makes it
            time.sleep(0.05 * attempt)
            publish(publisher, [100 + attempt])
            updates += poll_until(subscriber, lambda u: 0 in seqs(u), timeout=5)
            assert seqs(updates) == [0], attempt
            assert first_hash(batches(updates)[0]) == 100 + attempt
            assert not [u for u in updates if isinstance(u, (Gap, Reset))]
        publisher.shutdown()


class LossyRelay:
    """A PUB/SUB hop that drops chosen seqs: lost messages, as on a bad network."""

    def __init__(self, upstream: str, topic: bytes = b"kv") -> None:
        context = zmq.Context.instance()
        self.sub = context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, topic)
        self.sub.connect(upstream)
        self.pub = context.socket(zmq.PUB)
        self.port = free_port()
        self.pub.bind(f"tcp://127.0.0.1:{self.port}")

    def forward(self, drop: set[int], quiet: float = 0.5) -> list[int]:
        """Relay until nothing came for `quiet` seconds; return the seqs dropped."""
        dropped = []
        while self.sub.poll(int(quiet * 1000)):
            frames = self.sub.recv_multipart()
            seq = int.from_bytes(frames[1], "big")
            if seq in drop:
                dropped.append(seq)
            else:
                self.pub.send_multipart(frames)
        return dropped

    def close(self) -> None:
        self.sub.close(linger=0)
        self.pub.close(linger=0)


@pytest.fixture
def relay_factory():
    relays: list[LossyRelay] = []

    def make(upstream: str) -> LossyRelay:
        relays.append(LossyRelay(upstream))
        return relays[-1]

    yield make
    for relay in relays:
        relay.close()


def test_lost_messages_are_refilled_from_replay(publishers, relay_factory, transport):
    port, replay_port = free_port(), free_port()
    publisher = publishers(port, replay_port)
    relay = relay_factory(f"tcp://127.0.0.1:{port}")
    subscriber = Subscriber(
        f"tcp://127.0.0.1:{relay.port}",
        replay_endpoint=f"tcp://127.0.0.1:{replay_port}",
        topic="kv",
        transport=transport,
    )
    try:
        assert subscriber.poll(0.1) == []  # nothing published yet: an empty replay
        time.sleep(0.5)  # let both SUB sockets join
        publish(publisher, range(10))
        assert relay.forward(drop={4, 5, 8}) == [4, 5, 8]

        updates = poll_until(subscriber, lambda u: 9 in seqs(u))
        assert seqs(updates) == list(range(10))
        assert [first_hash(u) for u in batches(updates)] == list(range(10))
        replayed = {u.seq for u in batches(updates) if u.replayed}
        assert {4, 5, 8} <= replayed
        assert not [u for u in updates if isinstance(u, (Gap, Reset))]
        assert subscriber.stats.num_gaps == 0
    finally:
        subscriber.close()


def test_lost_messages_without_replay_are_reported_as_gaps(publishers, relay_factory, transport):
    port = free_port()
    publisher = publishers(port, None)
    relay = relay_factory(f"tcp://127.0.0.1:{port}")
    endpoint = f"tcp://127.0.0.1:{relay.port}"
    with Subscriber(endpoint, topic="kv", transport=transport) as subscriber:
        # let the SUB join (the zmtp transport connects inside poll(), pyzmq in the background)
        assert subscriber.poll(0.5) == []
        publish(publisher, range(10))
        relay.forward(drop={6, 7})
        updates = poll_until(subscriber, lambda u: 9 in seqs(u))
        gaps = [u for u in updates if isinstance(u, Gap)]
        assert gaps == [Gap(subscriber.source, 6, 7)]
        # the gap is reported where it happened, between 5 and 8
        kinds = [(type(u).__name__, getattr(u, "seq", None)) for u in updates]
        assert kinds.index(("Gap", None)) == kinds.index(("ReceivedBatch", 8)) - 1
        assert seqs(updates)[-3:] == [5, 8, 9]
        assert subscriber.stats.num_lost == 2


def test_engine_restart_is_reported_as_reset(publishers, transport):
    port, replay_port = free_port(), free_port()
    endpoint, replay = f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{replay_port}"
    first = publishers(port, replay_port)
    publish(first, range(20))
    time.sleep(0.3)
    with Subscriber(
        endpoint, replay_endpoint=replay, topic="kv", transport=transport
    ) as subscriber:
        before = poll_until(subscriber, lambda u: 19 in seqs(u))
        assert seqs(before) == list(range(20))

        first.shutdown()  # the engine restarts: a new process, seq from 0
        second = publishers(port, replay_port)
        updates: list[Update] = []
        for attempt in range(10):  # until the SUB has reconnected and sees the new engine
            publish(second, [1000 + attempt])
            updates += poll_until(subscriber, lambda u: bool(batches(u)), timeout=0.5)
            if batches(updates):
                break
        assert isinstance(updates[0], Reset) and updates[0].source == endpoint
        after = batches(updates)
        assert after[0].seq == 0 and first_hash(after[0]) == 1000  # replayed if SUB missed it
        assert [u.seq for u in after] == list(range(len(after)))
        assert subscriber.stats.num_resets == 1


def test_replay_endpoint_down_costs_one_bounded_wait(publishers, transport):
    port = free_port()
    publishers(port, None)
    subscriber = Subscriber(
        f"tcp://127.0.0.1:{port}",
        replay_endpoint=f"tcp://127.0.0.1:{free_port()}",  # nobody there
        replay_timeout=0.3,
        transport=transport,
    )
    # The replay is asked for once the live subscription is on its way; the poll that asks
    # waits about replay_timeout for an endpoint that never answers, no more.
    deadline = time.monotonic() + 10
    while not subscriber.stats.num_replay_failures:
        assert time.monotonic() < deadline, "the replay was never asked for"
        started = time.monotonic()
        assert subscriber.poll(0.0) == []
        assert time.monotonic() - started < 2.0
    assert subscriber.stats.num_replay_failures == 1
    subscriber.close()
    subscriber.close()  # idempotent
    assert subscriber.closed


def test_consumer_side_imports_no_vllm():
    # the router image has no vLLM or torch
    code = (
        "import sys, vllm_llmd.events.subscriber, vllm_llmd.events.__main__;"
        "heavy = [m for m in ('vllm', 'torch') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bind_address_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"tcp://127\.0\.0\.1:5557"):
        Subscriber("tcp://*:5557")


# ---- watch CLI ---------------------------------------------------------------------------------


# local ISO 8601 with milliseconds: this machine's clock, then the batch's own ts
STAMPS = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\S+ batch_ts=\S+ "
WATCH_LINE = re.compile(
    STAMPS + r"seq=\d+ (BlockStored|BlockRemoved) medium=\S+ blocks=\d+ first_hash=[0-9a-f]{16}"
    r"|" + STAMPS + r"seq=\d+ AllBlocksCleared"
)


def test_watch_help_runs_as_a_module():
    top = subprocess.run(
        [sys.executable, "-m", "vllm_llmd.events", "--help"], capture_output=True, text=True
    )
    assert top.returncode == 0 and "watch" in top.stdout
    sub = subprocess.run(
        [sys.executable, "-m", "vllm_llmd.events", "watch", "--help"],
        capture_output=True,
        text=True,
    )
    assert sub.returncode == 0 and "--replay" in sub.stdout and "--topic" in sub.stdout
    assert "--transport" in sub.stdout


def test_watch_refuses_a_bind_address(capsys):
    assert cli.main(["watch", "tcp://*:5557"]) == 2
    assert "bind address" in capsys.readouterr().err


def test_watch_prints_one_line_per_event(publishers, capsys, transport):
    port, replay_port = free_port(), free_port()
    publisher = publishers(port, replay_port)
    publisher.publish(
        vllm_batch(
            vllm_stored(41, 3, parent_block_hash=40, lora_name="sql"),
            vllm_events.BlockRemoved(block_hashes=[41], medium="GPU"),
            vllm_events.AllBlocksCleared(),
        )
    )
    time.sleep(0.3)
    argv = ["watch", f"tcp://127.0.0.1:{port}", "--replay", f"tcp://127.0.0.1:{replay_port}"]
    argv += ["--transport", transport]
    assert cli.main([*argv, "--topic", "kv", "--duration", "0.5"]) == 0
    out, err = capsys.readouterr()
    assert all(WATCH_LINE.match(line) for line in out.splitlines()), out
    # after the two timestamps; hashes in hashing.short_hash's spelling
    assert [line.split(" ", 2)[2] for line in out.splitlines()] == [
        "seq=0 BlockStored medium=GPU blocks=3 first_hash=0000000000000029 "
        "parent=0000000000000028 block_size=16 tokens=48 group=None lora=sql replayed",
        "seq=0 BlockRemoved medium=GPU blocks=1 first_hash=0000000000000029 group=None replayed",
        "seq=0 AllBlocksCleared replayed",
    ]
    assert "watching" in err and f"transport={transport}" in err and "summary:" in err


def test_watch_says_when_nothing_answers_and_exits_1(capsys):
    # Before, a watcher pointed at nothing printed a summary of zero batches and exited 0.
    argv = ["watch", f"tcp://127.0.0.1:{free_port()}", "--duration", "0.5"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "no events in" in err and "nothing answers at tcp://127.0.0.1:" in err


def test_watch_says_once_when_connected_but_quiet(publishers, capsys, transport):
    port = free_port()
    publishers(port, None)  # up, publishing nothing
    argv = ["watch", f"tcp://127.0.0.1:{port}", "--transport", transport]
    assert cli.main([*argv, "--duration", "1.5", "--silence-warning-s", "0.5"]) == 1
    err = capsys.readouterr().err
    assert err.count("no events in 0.5 s: connected to") == 1, err


# ---- end to end: a real vLLM server -------------------------------------------------------------

# every token sequence sent to the events server (prompt + output), to explain each event
SENT: list[list[int]] = []


@pytest.fixture(scope="module")
def events_server(tiny_model, vllm_servers):
    port, replay_port = free_port(), free_port()
    config = VLLMServerConfig(
        model=tiny_model,
        kv_events_config={
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{port}",
            "replay_endpoint": f"tcp://*:{replay_port}",
            "topic": "kv",
        },
    )
    server = vllm_servers.shared("tiny-events", config)
    return server, f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{replay_port}"


def send(server, prompt_ids: list[int]) -> list[int]:
    """Complete a token-id prompt; returns prompt + generated ids and records them."""
    answer = complete(server.url, server.model_name, prompt_ids, max_tokens=16)
    all_ids = prompt_ids + completion_token_ids(answer)
    SENT.append(all_ids)
    return all_ids


def tokenize(server, text: str) -> list[int]:
    return post_json(server.url + "/tokenize", {"model": server.model_name, "prompt": text})[
        "tokens"
    ]


def check_against_sent(event: BlockStored, hasher: PrefixHasher) -> None:
    """The event's hashes are a run of some sent sequence's chain, recomputed here."""
    for all_ids in SENT:
        chain = hasher.event_hashes(all_ids)
        if event.block_hashes[0] not in chain:
            continue
        start = chain.index(event.block_hashes[0])
        n = len(event.block_hashes)
        assert list(event.block_hashes) == chain[start : start + n]
        assert event.parent_block_hash == (chain[start - 1] if start else None)
        size = hasher.block_size
        assert list(event.token_ids) == all_ids[start * size : (start + n) * size]
        return
    raise AssertionError(f"hash {event.block_hashes[0]} is in no chain of the sent requests")


@pytest.mark.server
def test_every_published_hash_is_reproduced(events_server, transport):
    server, endpoint, replay = events_server
    hasher = PrefixHasher(128)  # vLLM's default block size on CPU
    with Subscriber(
        endpoint, replay_endpoint=replay, topic="kv", transport=transport
    ) as subscriber:
        subscriber.poll(0.1)
        # new prompts per transport: the shared server has cached the other run's blocks
        seed = 11 + 10 * TRANSPORTS.index(transport)
        first = send(server, tokenize(server, sample_text(400, seed=seed)))
        prompt = first[:-16]
        # shares the first prompt: a prefix hit, then new blocks chained on it
        second = send(server, prompt + tokenize(server, sample_text(150, seed=seed + 1)))
        wanted = {h for ids in (prompt, second[:-16]) for h in hasher.event_hashes(ids)}
        assert len(wanted) >= 5

        stored: list[BlockStored] = []

        def covered(updates: list[Update]) -> bool:
            stored.extend(
                e for u in batches(updates) for e in u.batch.events if isinstance(e, BlockStored)
            )
            updates.clear()
            return wanted <= {h for e in stored for h in e.block_hashes}

        poll_until(subscriber, covered, timeout=30)
        assert wanted <= {h for e in stored for h in e.block_hashes}
        assert any(e.parent_block_hash is not None for e in stored)  # chained on a parent
        for event in stored:
            assert (event.medium, event.block_size) == ("GPU", 128)
            check_against_sent(event, hasher)
        assert subscriber.stats.num_gaps == subscriber.stats.num_resets == 0
        assert subscriber.stats.num_malformed_events == 0


@pytest.mark.server
def test_watch_cli_against_a_server(events_server):
    server, endpoint, replay = events_server
    argv = ["watch", endpoint, "--replay", replay, "--topic", "kv", "--duration", "6"]
    watch = subprocess.Popen(
        [sys.executable, "-m", "vllm_llmd.events", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ids = send(server, tokenize(server, sample_text(300, seed=21)))
        out, err = watch.communicate(timeout=60)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    assert watch.returncode == 0, err
    lines = out.splitlines()
    assert lines and all(WATCH_LINE.match(line) for line in lines), out
    first = PrefixHasher(128).event_hashes(ids)[0]
    assert any(
        "BlockStored medium=GPU blocks=" in line and f"first_hash={short_hash(first)} " in line
        for line in lines
    ), out
    assert "summary:" in err
