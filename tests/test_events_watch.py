"""The events watcher as an operator runs it (`vllm-llmd-events watch`, or `python -m
vllm_llmd.events watch`): every line stamped with this machine's clock and the batch's own ts,
hashes in the one short spelling (`hashing.short_hash`), and `--pod URL` finding the endpoints
the way the router does (a stub pod's GET /kv_event_sources, pointing at a ZMQ publisher here).
No vLLM: the publisher is a plain XPUB socket sending vLLM's wire frames.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgspec
import pytest
import zmq
from aiohttp import web

from vllm_llmd.events import __main__ as cli
from vllm_llmd.events.model import BlockStored, EventBatch
from vllm_llmd.events.updates import Gap, ReceivedBatch, Reset
from vllm_llmd.events.wire import encode_seq
from vllm_llmd.hashing import hash_hex, short_hash, to_event_hash

ISO_MS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}(?:[+-]\d\d:\d\d|Z)"
EVENT_LINE = re.compile(rf"^(?P<wall>{ISO_MS}) batch_ts=(?P<batch>{ISO_MS}) (?P<body>seq=\d+ .*)$")
DIGEST = hashlib.sha256(b"a block").digest()  # as the engine's prefix cache holds it
PARENT = hashlib.sha256(b"its parent").digest()


@contextmanager
def stub_pod(sources: Any) -> Iterator[str]:
    """A vLLM pod's HTTP server answering GET /kv_event_sources with `sources`; its URL."""
    loop = asyncio.new_event_loop()

    async def event_sources(_: web.Request) -> web.Response:
        return web.json_response(sources)

    app = web.Application()
    app.router.add_get("/kv_event_sources", event_sources)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def payload(ts: float, *events: dict[str, Any]) -> bytes:
    """One KVEventBatch as vLLM encodes it (map-form events)."""
    return msgspec.msgpack.encode([ts, list(events), 0])


class Publisher:
    """A ZMQ publisher on a free port that sends `messages` once a subscriber has subscribed."""

    def __init__(self, messages: list[bytes], topic: bytes = b"kv") -> None:
        self.socket = zmq.Context.instance().socket(zmq.XPUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind("tcp://127.0.0.1:*")
        self.port = int(self.socket.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        self.messages, self.topic = messages, topic
        self.sent = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.socket.poll(50) and self.socket.recv().startswith(b"\x01"):
                time.sleep(0.1)  # the subscription is in: let the subscriber settle
                for seq, body in enumerate(self.messages):
                    self.socket.send_multipart([self.topic, encode_seq(seq), body])
                self.sent.set()
                return

    def close(self) -> None:
        self._thread.join(timeout=20)
        self.socket.close(linger=0)


def test_watch_pod_prints_stamped_lines_in_the_short_hash_spelling(capsys):
    batch_ts = time.time() - 0.25
    messages = [
        # VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0: the engine sends the raw digests
        payload(
            batch_ts,
            {
                "type": "BlockStored",
                "block_hashes": [DIGEST],
                "parent_block_hash": PARENT,
                "token_ids": list(range(16)),
                "block_size": 16,
                "medium": "CPU",
            },
        ),
        # vLLM's default: the int form (the digest's last 8 bytes)
        payload(
            batch_ts + 0.1,
            {"type": "BlockRemoved", "block_hashes": [to_event_hash(DIGEST)], "medium": "CPU"},
        ),
    ]
    publisher = Publisher(messages)
    sources = {
        "0": {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{publisher.port}",  # a bind address, as vLLM reports it
            "replay_endpoint": None,
            "topic": "kv",
        }
    }
    try:
        with stub_pod(sources) as url:
            assert cli.main(["watch", "--pod", url, "--topic", "kv", "--duration", "3"]) == 0
    finally:
        publisher.close()
    assert publisher.sent.is_set()
    out, err = capsys.readouterr()
    assert f"pod {url}: events at tcp://127.0.0.1:{publisher.port}, replay at None" in err
    assert "summary:" in err
    lines = out.splitlines()
    matches = [EVENT_LINE.match(line) for line in lines]
    assert len(lines) == 2 and all(matches), out
    stored, removed = (m["body"] for m in matches if m)
    short = short_hash(DIGEST)
    assert stored == (
        f"seq=0 BlockStored medium=CPU blocks=1 first_hash={short} "
        f"parent={short_hash(PARENT)} block_size=16 tokens=16 group=None"
    )
    assert removed == f"seq=1 BlockRemoved medium=CPU blocks=1 first_hash={short} group=None"
    # both wire forms print the same, and it ends the debug state file's full spelling
    assert hash_hex(DIGEST).endswith(short) and len(short) == 16
    # the batch's own ts, the engine's clock: not this machine's
    first = matches[0]
    assert first and first["batch"] == cli.timestamp(batch_ts) != first["wall"]


def test_watch_pod_unreachable_exits_nonzero_saying_why(capsys):
    with stub_pod({}) as url:
        pass  # now closed: nothing answers there
    started = time.monotonic()
    assert cli.main(["watch", "--pod", url, "--duration", "1"]) == 2
    assert time.monotonic() - started < 10
    out, err = capsys.readouterr()
    assert out == ""
    assert f"error: cannot find the KV-event endpoint of pod {url}" in err
    assert f"GET {url}/kv_event_sources failed" in err


@pytest.mark.parametrize(
    ("sources", "said"),
    [
        ({"0": {"enable_kv_cache_events": False}}, "enable_kv_cache_events is off"),
        ({}, "lists no event sources"),
        (["not", "an", "object"], "gave a bad answer: /kv_event_sources answered an array"),
    ],
)
def test_watch_pod_without_events_exits_nonzero_saying_why(capsys, sources, said):
    with stub_pod(sources) as url:
        assert cli.main(["watch", "--pod", url, "--duration", "1"]) == 2
    assert said in capsys.readouterr().err


def test_watch_pod_as_a_module_exits_nonzero():
    with stub_pod({}) as url:
        pass
    done = subprocess.run(
        [sys.executable, "-m", "vllm_llmd.events", "watch", "--pod", url, "--duration", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done
    assert "cannot find the KV-event endpoint of pod" in done.stderr
    assert "Traceback" not in done.stderr


def test_watch_needs_an_endpoint_or_a_pod_not_both(capsys):
    for argv in (["watch"], ["watch", "tcp://127.0.0.1:5557", "--pod", "http://127.0.0.1:1"]):
        with pytest.raises(SystemExit) as exited:
            cli.main(argv)
        assert exited.value.code == 2
        assert "give an ENDPOINT or --pod URL" in capsys.readouterr().err


def test_the_installed_command_names_itself(monkeypatch):
    # pyproject: vllm-llmd-events = "vllm_llmd.events.__main__:main"
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/vllm-llmd-events"])
    assert cli.build_parser().prog == "vllm-llmd-events"
    monkeypatch.setattr(sys, "argv", ["/x/vllm_llmd/events/__main__.py"])
    assert cli.build_parser().prog == "python -m vllm_llmd.events"


def test_every_update_line_is_stamped():
    now = 1_700_000_000.123
    stored = BlockStored(
        block_hashes=(to_event_hash(DIGEST),),
        parent_block_hash=None,
        token_ids=tuple(range(16)),
        block_size=16,
        medium="GPU",
    )
    batch = EventBatch(ts=now - 1.5, events=(stored,), num_malformed=1)
    wall, engine = cli.timestamp(now), cli.timestamp(now - 1.5)
    assert re.fullmatch(ISO_MS, wall) and wall != engine
    assert cli.format_update(ReceivedBatch("pod", 7, batch), now=now) == [
        f"{wall} batch_ts={engine} seq=7 BlockStored medium=GPU blocks=1 "
        f"first_hash={short_hash(DIGEST)} parent=None block_size=16 tokens=16 group=None",
        f"{wall} batch_ts={engine} seq=7 skipped malformed=1 unknown=0",
    ]
    assert cli.format_update(Reset("pod", 0), now=now) == [
        f"{wall} RESET seq=0 (the engine restarted; forget its blocks)"
    ]
    assert cli.format_update(Gap("pod", 5, 9), now=now) == [f"{wall} GAP seq=5..9 lost"]
    # a publisher's clock that is no time at all is printed as sent, not a crash
    assert cli.timestamp(float("nan")) == "nan" and cli.timestamp(1e300) == "1e+300"
