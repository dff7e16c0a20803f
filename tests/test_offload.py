"""Offload tiers on real vLLM CPU servers (small model, float32, a device cache of 24 blocks).

Six prompts of seven full blocks each (42 blocks) do not fit the device cache, so a second round
of the same prompts finds them evicted there. With the host tier they come back from host
memory; with a small host tier they spill to disk and come back from disk; with a host tier of
four blocks, whose slots are all pinned while a prompt's blocks are stored, the rest go straight
to disk and every block comes back, from disk, whole; after a restart with the same disk folder
they come back from the files; a corrupted file is rejected and recomputed. Greedy output always
equals a plain vLLM's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from vllm_llmd.devtools.client import complete, completion_token_ids, metric_sum, scrape_metrics
from vllm_llmd.devtools.model_maker import sample_text
from vllm_llmd.devtools.server import VLLMServerConfig, llmd_connector

pytestmark = pytest.mark.server

BLOCK = 128
DEVICE_CACHE_BYTES = 30 << 20  # 24 blocks of the small model in float32 (1.25 MiB each)
PROMPT_TOKENS = 7 * BLOCK + 40
NUM_PROMPTS = 6
BLOCKS_PER_ROUND = NUM_PROMPTS * (PROMPT_TOKENS // BLOCK)


def _config(model: Path, cores: str, extra: dict | None) -> VLLMServerConfig:
    return VLLMServerConfig(
        model=model,
        cpu_cores=cores,
        kv_cache_bytes=DEVICE_CACHE_BYTES,
        max_model_len=2048,
        kv_transfer_config=None if extra is None else llmd_connector(extra=extra),
    )


@pytest.fixture(scope="module")
def disk_folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("disk-tier")


@pytest.fixture(scope="module")
def tiny_host_disk_folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("disk-tier-tiny-host")


@pytest.fixture(scope="module")
def servers(vllm_servers, small_model, disk_folder, tiny_host_disk_folder):
    return vllm_servers.shared_group(
        {
            "offload-host": _config(small_model, "0", {"host_offload_bytes": 200 << 20}),
            "offload-tiny-host": _config(
                small_model,
                "1",
                {
                    "host_offload_bytes": 5 << 20,  # 4 blocks
                    "disk_offload_path": str(tiny_host_disk_folder),
                },
            ),
            "offload-disk": _config(
                small_model,
                "0",
                {
                    "host_offload_bytes": 12 << 20,  # 9 chunks: most of a round must spill
                    "disk_offload_path": str(disk_folder),
                },
            ),
            "offload-reference": _config(small_model, "1", None),
        }
    )


@pytest.fixture(scope="module")
def prompts(small_model):
    tokenizer = Tokenizer.from_file(str(small_model / "tokenizer.json"))
    return [
        tokenizer.encode(sample_text(PROMPT_TOKENS, seed=700 + i)).ids[:PROMPT_TOKENS]
        for i in range(NUM_PROMPTS)
    ]


@pytest.fixture(scope="module")
def reference_outputs(servers, prompts):
    ref = servers["offload-reference"]
    return [
        completion_token_ids(complete(ref.url, ref.model_name, p, max_tokens=12)) for p in prompts
    ]


def _snapshot(server) -> dict[str, float]:
    samples = scrape_metrics(server.url)
    snap = {
        src: metric_sum(samples, "vllm:prompt_tokens_by_source_total", source=src)
        for src in ("local_compute", "local_cache_hit", "external_kv_transfer")
    }
    for key in ("stored", "loaded", "spilled", "promoted", "rejected", "dropped"):
        snap[key] = metric_sum(samples, f"llmd:offload_{key}_chunks_total")
    snap["device_blocks"] = metric_sum(samples, "vllm:cache_config_info")  # presence only
    return snap


def _round(server, prompts) -> tuple[list[list[int]], dict[str, float]]:
    before = _snapshot(server)
    outputs = [
        completion_token_ids(complete(server.url, server.model_name, p, max_tokens=12))
        for p in prompts
    ]
    after = _snapshot(server)
    return outputs, {k: after[k] - before[k] for k in after}


def test_device_cache_is_really_small(servers):
    log = servers["offload-host"].log_text()
    assert "24 blocks, 262144 bytes per block per layer" in log  # 24 blocks x 5 layers


def test_second_round_loads_from_host_tier(servers, prompts, reference_outputs):
    server = servers["offload-host"]
    first, moved = _round(server, prompts)
    assert first == reference_outputs
    assert moved["external_kv_transfer"] == 0 and moved["stored"] == BLOCKS_PER_ROUND

    second, moved = _round(server, prompts)
    assert second == reference_outputs
    # Every full block came from the host tier; vLLM's metric and ours agree.
    assert moved["external_kv_transfer"] == BLOCKS_PER_ROUND * BLOCK
    assert moved["loaded"] == BLOCKS_PER_ROUND
    assert moved["local_compute"] == NUM_PROMPTS * (PROMPT_TOKENS % BLOCK)
    # the scheduler half's occupancy gauges: the first round's blocks are held, within capacity
    samples = scrape_metrics(server.url)
    held = metric_sum(samples, "llmd:offload_host_chunks")
    assert BLOCKS_PER_ROUND <= held <= metric_sum(samples, "llmd:offload_host_capacity_chunks")


def test_tiny_host_tier_spills_to_disk_and_loads_back(
    servers, prompts, reference_outputs, disk_folder
):
    server = servers["offload-disk"]
    first, moved = _round(server, prompts)
    assert first == reference_outputs
    assert moved["spilled"] >= BLOCKS_PER_ROUND - 9
    assert len(list(disk_folder.rglob("*.safetensors"))) >= BLOCKS_PER_ROUND - 9

    second, moved = _round(server, prompts)
    assert second == reference_outputs
    assert moved["promoted"] > 0  # came back from disk, through the host tier
    assert moved["external_kv_transfer"] == BLOCKS_PER_ROUND * BLOCK
    assert moved["rejected"] == 0


def test_a_host_tier_of_four_blocks_loses_none_and_disk_hits_load_whole(
    servers, prompts, reference_outputs, tiny_host_disk_folder
):
    """Before, stores stopped for the step once the host slots were pinned (the rest of the
    prompt reached no tier) and disk hits came back only as far as host slots were free."""
    server = servers["offload-tiny-host"]
    first, moved = _round(server, prompts)
    assert first == reference_outputs
    assert moved["dropped"] == 0
    # Every computed prompt block reached a tier: the host's four slots, or a disk file.
    files = list(tiny_host_disk_folder.rglob("*.safetensors"))
    assert len(files) >= BLOCKS_PER_ROUND - 4, (len(files), moved)

    second, moved = _round(server, prompts)
    assert second == reference_outputs
    # Every full block of every prompt came back, nearly all of them from disk.
    assert moved["external_kv_transfer"] == BLOCKS_PER_ROUND * BLOCK, moved
    assert moved["promoted"] >= BLOCKS_PER_ROUND - 4
    assert moved["local_compute"] == NUM_PROMPTS * (PROMPT_TOKENS % BLOCK)
    assert moved["rejected"] == 0 and moved["dropped"] == 0


def _leading_blocks_on_disk(folder: Path, prompts: list[list[int]], bad: Path) -> int:
    """How many leading blocks of the prompts have a good file: each file's info names its
    tokens and parent, so the prompts' block chains are followed without vLLM's hashing."""
    from safetensors import safe_open

    key_of = {}
    for path in folder.rglob("*.safetensors"):
        if path == bad:
            continue
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
        info = json.loads(metadata["info"])
        key_of[(info["parent"], tuple(info["token_ids"]))] = metadata["key"]
    total = 0
    for prompt in prompts:
        parent = None
        for i in range(PROMPT_TOKENS // BLOCK):
            parent = key_of.get((parent, tuple(prompt[i * BLOCK : (i + 1) * BLOCK])))
            if parent is None:
                break
            total += 1
    return total


def test_restart_loads_from_disk_and_rejects_a_corrupt_file(
    servers, vllm_servers, small_model, prompts, reference_outputs, disk_folder
):
    if len(list(disk_folder.rglob("*.safetensors"))) < BLOCKS_PER_ROUND - 9:
        _round(servers["offload-disk"], prompts)  # run alone: fill the disk tier first
    config = servers["offload-disk"].config
    servers["offload-disk"].stop()
    files = sorted(disk_folder.rglob("*.safetensors"))
    assert len(files) >= BLOCKS_PER_ROUND - 9
    victim = files[len(files) // 2]
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0xFF  # one payload byte: header intact, checksum broken
    victim.write_bytes(bytes(data))

    restarted = vllm_servers.launch(
        _config(
            small_model,
            "0",
            {
                "host_offload_bytes": 12 << 20,
                "disk_offload_path": str(disk_folder),
            },
        ),
        "offload-disk-restarted",
    )
    assert restarted.config.port != config.port
    log = restarted.log_text()
    assert "blocks found on disk" in log

    expected_blocks = _leading_blocks_on_disk(disk_folder, prompts, victim)
    outputs, moved = _round(restarted, prompts)
    assert outputs == reference_outputs
    assert moved["rejected"] == 1
    # Deleted on rejection; the recomputed block may since have been spilled again, intact.
    assert not victim.exists() or victim.read_bytes() != bytes(data)
    # Each prompt's blocks came from disk as far as its files reach (the host tier's blocks
    # were not written to disk, and the corrupt file ends its prompt's run).
    assert expected_blocks >= BLOCKS_PER_ROUND // 2
    assert moved["external_kv_transfer"] == expected_blocks * BLOCK, moved
    assert moved["local_compute"] > NUM_PROMPTS * (PROMPT_TOKENS % BLOCK)
    restarted.stop()
