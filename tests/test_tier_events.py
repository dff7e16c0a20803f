"""Tier events on a real vLLM CPU server: small model, small device cache, host + disk tiers,
vLLM's KV-event publisher on (zmq, with replay).

The subscriber starts late (after the workload), so everything it sees came through replay.
Every published BlockStored — device (GPU) and tier (CPU, STORAGE) alike — must be explained by
our own hash chain over the prompts' tokens; the raw batches must decode with vLLM's own
classes; and what the events say each tier holds must equal what the tiers really hold.
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path

import msgspec
import pytest
from tokenizers import Tokenizer

from vllm_llmd.devtools.client import complete
from vllm_llmd.devtools.model_maker import sample_text
from vllm_llmd.devtools.server import VLLMServerConfig, free_port
from vllm_llmd.events.model import BlockRemoved, BlockStored
from vllm_llmd.events.replay import ReplayClient
from vllm_llmd.events.subscriber import Subscriber
from vllm_llmd.events.updates import ReceivedBatch, Reset
from vllm_llmd.hashing import PrefixHasher

pytestmark = pytest.mark.server

BLOCK = 128
PROMPT_TOKENS = 5 * BLOCK + 17


@pytest.fixture(scope="module")
def events_server(vllm_servers, small_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tier-events")
    port, replay_port = free_port(), free_port()
    config = VLLMServerConfig(
        model=small_model,
        cpu_cores="0",
        kv_cache_bytes=30 << 20,
        max_model_len=2048,
        kv_transfer_config={
            "kv_connector": "LLMDConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {
                "host_offload_bytes": 12 << 20,  # 9 chunks
                "disk_offload_path": str(folder / "disk"),
                "debug_state_path": str(folder / "state.json"),
            },
        },
        kv_events_config={
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "topic": "kv",
            "endpoint": f"tcp://*:{port}",
            "replay_endpoint": f"tcp://*:{replay_port}",
        },
    )
    server = vllm_servers.shared("tier-events", config)
    return server, f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{replay_port}", folder


@pytest.fixture(scope="module")
def workload(events_server, small_model):
    """Two rounds of six prompts: device evictions, host stores, spills, loads from disk."""
    server, *_ = events_server
    tokenizer = Tokenizer.from_file(str(small_model / "tokenizer.json"))
    prompts = [
        tokenizer.encode(sample_text(PROMPT_TOKENS, seed=900 + i)).ids[:PROMPT_TOKENS]
        for i in range(6)
    ]
    for _ in range(2):
        for prompt in prompts:
            complete(server.url, server.model_name, prompt, max_tokens=4)
    return prompts


def _collect(endpoint: str, replay: str, quiet_s: float = 2.0, limit_s: float = 60.0):
    """Every batch the server published, via a late subscriber; stops after quiet_s silence."""
    batches = []
    with Subscriber(endpoint, replay_endpoint=replay, topic="kv") as subscriber:
        deadline = time.monotonic() + limit_s
        last = time.monotonic()
        while time.monotonic() - last < quiet_s and time.monotonic() < deadline:
            updates = subscriber.poll(0.2)
            assert not [u for u in updates if isinstance(u, Reset)]
            got = [u for u in updates if isinstance(u, ReceivedBatch)]
            if got:
                last = time.monotonic()
                batches.extend(got)
    return batches


def _wait_stable(path: Path, quiet_s: float = 2.0) -> dict:
    """The debug state once it stopped changing (spills finish in the background)."""
    previous, since = None, time.monotonic()
    while True:
        current = path.read_text() if path.exists() else None
        if current != previous:
            previous, since = current, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return json.loads(current)
        time.sleep(0.2)


def test_tier_events_match_tiers_hashes_and_vllm_decoder(events_server, workload):
    _server, endpoint, replay, folder = events_server
    state = _wait_stable(folder / "state.json")
    batches = _collect(endpoint, replay)
    assert batches and all(b.replayed for b in batches[:1])  # the late start replayed

    # 1. Every BlockStored is explained by our own hash chain over the prompts.
    hasher = PrefixHasher(block_size=BLOCK)
    known = {}  # event hash -> (tokens, parent event hash)
    for prompt in workload:
        hashes = hasher.event_hashes(prompt)
        for i, h in enumerate(hashes):
            known[h] = (list(prompt[i * BLOCK : (i + 1) * BLOCK]), hashes[i - 1] if i else None)
    stored = [e for b in batches for e in b.events if isinstance(e, BlockStored)]
    media = collections.Counter(e.medium for e in stored)
    assert media["GPU"] and media["CPU"] and media["STORAGE"], media
    for event in stored:
        for i, h in enumerate(event.block_hashes):
            tokens, parent = known[h]  # KeyError: a hash our chain does not produce
            assert list(event.token_ids[i * BLOCK : (i + 1) * BLOCK]) == tokens
            expected_parent = parent if i == 0 else event.block_hashes[i - 1]
            if i == 0:
                assert event.parent_block_hash == expected_parent
        assert event.block_size == BLOCK

    # 2. The raw batches decode with vLLM's own classes (wire compatibility).
    from vllm.distributed.kv_events import BlockStored as VllmBlockStored
    from vllm.distributed.kv_events import KVEventBatch

    decoder = msgspec.msgpack.Decoder(KVEventBatch)
    replayed = ReplayClient(replay).fetch(0)
    vllm_media = collections.Counter(
        e.medium
        for raw in replayed.messages
        for e in decoder.decode(raw.payload).events
        if isinstance(e, VllmBlockStored)
    )
    assert vllm_media["CPU"] == media["CPU"] and vllm_media["STORAGE"] == media["STORAGE"]

    # 3. What the events say each tier holds is what the tiers hold.
    present = collections.Counter()
    for batch in batches:
        for event in batch.events:
            sign = 1 if isinstance(event, BlockStored) else -1
            if isinstance(event, BlockStored | BlockRemoved) and event.medium in ("CPU", "STORAGE"):
                for h in event.block_hashes:
                    present[(h, event.medium)] += sign
    assert all(count in (0, 1) for count in present.values()), present
    said = {key for key, count in present.items() if count == 1}

    held = {(event_hash(k), "CPU") for k in state["host"]}
    held |= {(event_hash(k), "STORAGE") for k in state["disk"]}
    assert len(held) > 9
    assert said == held


def event_hash(hex_key: str) -> int:
    """The hash a KV event carries for a block key (its last 8 bytes)."""
    return int.from_bytes(bytes.fromhex(hex_key), "big") & (2**64 - 1)


def test_subscriber_resets_its_view_when_the_server_restarts(events_server, workload, vllm_servers):
    """...and the restarted engine announces the blocks it found on disk (indexed by name at
    start, their headers read in the background), with the tokens they hold."""
    server, endpoint, replay, folder = events_server
    with Subscriber(endpoint, replay_endpoint=replay, topic="kv") as subscriber:
        deadline = time.monotonic() + 30
        seen = []
        while not seen and time.monotonic() < deadline:  # caught up through replay
            seen = [u for u in subscriber.poll(0.5) if isinstance(u, ReceivedBatch)]
        assert seen
        while subscriber.poll(1.0):
            pass
        last_seq = subscriber.next_seq - 1
        assert last_seq > 5

        server.stop()  # same ports, same disk folder: a restarted engine starts at seq 0
        files = list((folder / "disk").rglob("*.safetensors"))
        on_disk = {event_hash(path.name.split("-")[0]) for path in files}
        assert len(on_disk) > 9
        restarted = vllm_servers.launch(server.config, "tier-events-restarted")
        updates = []
        announced: dict[int, BlockStored] = {}
        deadline = time.monotonic() + 60
        # Events leave with engine steps: a short request now and then drives them.
        while not on_disk <= set(announced) and time.monotonic() < deadline:
            complete(restarted.url, restarted.model_name, workload[0][:300], max_tokens=2)
            for update in subscriber.poll(0.5):
                updates.append(update)
                for event in update.events if isinstance(update, ReceivedBatch) else ():
                    if isinstance(event, BlockStored) and event.medium == "STORAGE":
                        announced.update(dict.fromkeys(event.block_hashes, event))
        resets = [u for u in updates if isinstance(u, Reset)]
        assert resets, updates
        after = [u for u in updates[updates.index(resets[0]) :] if isinstance(u, ReceivedBatch)]
        assert after and after[0].seq < last_seq
        assert on_disk <= set(announced), f"{len(on_disk - set(announced))} never announced"
        hasher = PrefixHasher(block_size=BLOCK)
        for prompt in workload:
            for i, h in enumerate(hasher.event_hashes(prompt)):
                if h in on_disk:
                    assert list(announced[h].token_ids) == prompt[i * BLOCK : (i + 1) * BLOCK]
        restarted.stop()
