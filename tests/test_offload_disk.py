"""The disk tier's chunk files: byte-exact round trips, validation, warm-restart scan, and
concurrent writes and reads that never expose a partial file. Real files under tmp_path."""

from __future__ import annotations

import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import factories
import pytest
import torch
from blake3 import blake3
from disk_harness import (
    NUM_LAYERS,
    PAGE_BYTES,
    make_block,
    make_fingerprint,
    make_key,
    make_store,
    set_mtime,
)
from safetensors import safe_open

from vllm_llmd.offload import disk_scan
from vllm_llmd.offload.direct_io import ALIGN, BlockFileWriter
from vllm_llmd.offload.disk_store import (
    CorruptBlockFileError,
    DiskBlockStore,
    MissingBlockFileError,
    ScannedBlockFile,
)

# ---- write / read ------------------------------------------------------------------------


def test_round_trip_is_byte_exact(tmp_path):
    store = make_store(tmp_path)
    for i in range(5):
        chunk = make_block(store.block_bytes, seed=i)
        size = store.write(make_key(i), chunk)
        path = store.path_for(make_key(i))
        assert size == path.stat().st_size > store.block_bytes
        assert torch.equal(store.read(make_key(i)), chunk)


def test_file_layout_and_it_is_plain_safetensors(tmp_path):
    store = make_store(tmp_path, tp_rank=1)
    key, chunk = make_key(0), make_block(store.block_bytes, seed=0)
    store.write(key, chunk)
    path = store.path_for(key)
    assert path == tmp_path / key.hex()[:2] / f"{key.hex()}-r1.safetensors"
    assert store.contains(key) and not store.contains(make_key(1))
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
        assert torch.equal(f.get_tensor("kv"), chunk)
    assert metadata["key"] == key.hex() and metadata["tp_rank"] == "1"
    assert metadata["format_version"] == "2" and '"num_layers":4' in metadata["fingerprint"]
    assert metadata["checksum"] == blake3(chunk.numpy()).hexdigest(length=16)


def test_read_into_out_buffer(tmp_path):
    store = make_store(tmp_path)
    chunk = make_block(store.block_bytes, seed=1)
    store.write(make_key(0), chunk)
    out = torch.zeros(NUM_LAYERS, PAGE_BYTES, dtype=torch.uint8)  # contiguous, any shape
    assert store.read(make_key(0), out=out) is out
    assert torch.equal(out.view(-1), chunk)


def test_rewrite_replaces_the_file(tmp_path):
    store = make_store(tmp_path)
    store.write(make_key(0), make_block(store.block_bytes, seed=1))
    newer = make_block(store.block_bytes, seed=2)
    store.write(make_key(0), newer)
    assert torch.equal(store.read(make_key(0)), newer)
    assert [p.name for p in store.path_for(make_key(0)).parent.iterdir()] == [
        store.path_for(make_key(0)).name
    ]  # no temp file left behind


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(999, dtype=torch.uint8),
        torch.zeros(1000, dtype=torch.int8),
        torch.zeros(500, dtype=torch.float16),  # right byte count, wrong dtype
        torch.zeros(2000, dtype=torch.uint8)[::2],  # not contiguous
    ],
)
def test_write_refuses_wrong_chunks(tmp_path, bad):
    store = make_store(tmp_path)
    with pytest.raises(ValueError, match="contiguous uint8 CPU tensor of 1000 elements"):
        store.write(make_key(0), bad)
    assert not store.contains(make_key(0))


def test_read_refuses_wrong_out_buffer(tmp_path):
    store = make_store(tmp_path)
    store.write(make_key(0), make_block(store.block_bytes, seed=0))
    with pytest.raises(ValueError, match="out must be"):
        store.read(make_key(0), out=torch.empty(999, dtype=torch.uint8))
    assert store.contains(make_key(0))  # a caller's mistake is not the file's fault


def test_constructor_checks_sizes_and_rank(tmp_path):
    fingerprint = make_fingerprint()
    with pytest.raises(ValueError, match=r"block_bytes=999 must equal num_layers \* page_bytes"):
        DiskBlockStore(tmp_path, fingerprint, 0, 999)
    with pytest.raises(ValueError, match="tp_rank=2 is outside tensor_parallel_size=2"):
        DiskBlockStore(tmp_path, fingerprint, 2, 1000)
    DiskBlockStore(tmp_path / "made" / "on demand", fingerprint, 0, 1000)
    assert (tmp_path / "made" / "on demand").is_dir()


def test_missing_chunk_and_delete(tmp_path):
    store = make_store(tmp_path)
    with pytest.raises(MissingBlockFileError, match="no such file"):
        store.read(make_key(0))
    store.delete(make_key(0))  # missing is fine
    store.write(make_key(0), make_block(store.block_bytes, seed=0))
    store.delete(make_key(0))
    assert not store.contains(make_key(0))


# ---- corruption --------------------------------------------------------------------------


def flip_byte(path: Path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_payload_byte_is_caught_by_read_and_deleted(tmp_path):
    store = make_store(tmp_path)
    store.write(make_key(0), make_block(store.block_bytes, seed=0))
    flip_byte(store.path_for(make_key(0)), offset_from_end=17)
    assert [c.key for c in store.scan()] == [make_key(0)]  # the header is fine
    out = torch.zeros(store.block_bytes, dtype=torch.uint8)
    with pytest.raises(CorruptBlockFileError, match="payload checksum mismatch; deleted") as info:
        store.read(make_key(0), out=out)
    assert info.value.path == store.path_for(make_key(0))
    assert not store.contains(make_key(0))


def test_other_fingerprint_names_the_field_on_read(tmp_path):
    make_store(tmp_path, num_layers=2, page_bytes=500).write(make_key(0), make_block(1000, seed=0))
    store = make_store(tmp_path)
    with pytest.raises(CorruptBlockFileError, match=r"num_layers: 2 != 4; page_bytes: 500 != 250"):
        store.read(make_key(0))
    assert not store.contains(make_key(0))


def test_truncated_file_is_rejected_by_read(tmp_path):
    store = make_store(tmp_path)
    store.write(make_key(0), make_block(store.block_bytes, seed=0))
    path = store.path_for(make_key(0))
    os.truncate(path, path.stat().st_size - 1)
    with pytest.raises(CorruptBlockFileError, match="expected"):
        store.read(make_key(0))
    assert not path.exists()


# ---- scan --------------------------------------------------------------------------------


def test_scan_returns_the_written_keys_oldest_first(tmp_path):
    store = make_store(tmp_path)
    keys = [make_key(i) for i in range(6)]
    sizes = {
        key: store.write(key, make_block(store.block_bytes, seed=i)) for i, key in enumerate(keys)
    }
    order = keys[:]
    random.Random(0).shuffle(order)
    now = time.time()
    for age, key in enumerate(reversed(order)):  # order[0] gets the oldest mtime
        set_mtime(store.path_for(key), now - 100 - age)
    assert store.scan() == [
        ScannedBlockFile(key, sizes[key], store.path_for(key).stat().st_mtime) for key in order
    ]
    assert make_store(tmp_path / "empty").scan() == []


def test_scan_deletes_invalid_files_and_keeps_other_ranks(tmp_path, caplog):
    store = make_store(tmp_path)
    good = make_key(0)
    store.write(good, make_block(1000, seed=0))

    # same rank, another model layout: deleted, and the log names the differing field
    other_model = make_key(1)
    make_store(tmp_path, head_size=32).write(other_model, make_block(1000, seed=1))
    # truncated payload, and truncated inside the header
    truncated_payload, truncated_header = make_key(2), make_key(3)
    for key in (truncated_payload, truncated_header):
        store.write(key, make_block(1000, seed=2))
    os.truncate(
        store.path_for(truncated_payload), store.path_for(truncated_payload).stat().st_size - 10
    )
    os.truncate(store.path_for(truncated_header), 20)
    # a crashed write's temp file (old), and one being written right now (young)
    shard = store.path_for(good).parent
    stale_temp = shard / f".{good.hex()}-r0.0123abcd.tmp"
    young_temp = shard / f".{good.hex()}-r0.4567abcd.tmp"
    stale_temp.write_bytes(b"partial")
    young_temp.write_bytes(b"partial")
    set_mtime(stale_temp, time.time() - 3600)
    # a chunk name in a folder that is not a shard (left alone), and in the wrong shard (deleted)
    assert not make_key(5).hex().startswith("00")
    misplaced = tmp_path / "zz"
    misplaced.mkdir()
    (misplaced / f"{make_key(4).hex()}-r0.safetensors").write_bytes(b"x")
    wrong_shard = tmp_path / "00" / f"{make_key(5).hex()}-r0.safetensors"
    wrong_shard.parent.mkdir(exist_ok=True)
    wrong_shard.write_bytes(b"x" * 64)
    # another worker's files: neither returned nor deleted, even if stale or invalid to us
    rank1 = make_store(tmp_path, tp_rank=1)
    rank1.write(make_key(6), make_block(1000, seed=6))
    rank1_temp = rank1.path_for(make_key(6)).parent / f".{make_key(6).hex()}-r1.89abcdef.tmp"
    rank1_temp.write_bytes(b"partial")
    set_mtime(rank1_temp, time.time() - 3600)
    # files that are not ours at all
    (tmp_path / "README").write_text("not a chunk")
    (shard / "notes.txt").write_text("not a chunk")

    # vLLM's logging config stops "vllm.*" records from reaching the root logger (caplog's
    # usual handler) once vllm is imported, so listen on our logger directly
    disk_scan.logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.DEBUG, logger=disk_scan.logger.name):
            scanned = store.scan()
    finally:
        disk_scan.logger.removeHandler(caplog.handler)

    assert [c.key for c in scanned] == [good]
    for gone in (other_model, truncated_payload, truncated_header):
        assert not store.path_for(gone).exists()
    assert not stale_temp.exists() and young_temp.exists()
    assert not wrong_shard.exists()
    assert (misplaced / f"{make_key(4).hex()}-r0.safetensors").exists()  # not a shard folder
    assert rank1.contains(make_key(6)) and rank1_temp.exists()
    assert (tmp_path / "README").exists() and (shard / "notes.txt").exists()
    assert [c.key for c in rank1.scan()] == [make_key(6)]
    assert "deleted 5 invalid ones" in caplog.text
    assert "head_size: 32 != 16" in caplog.text
    assert "leftover temp file" in caplog.text


def test_scan_reads_headers_only(tmp_path, monkeypatch):
    store = make_store(tmp_path)
    store.write(make_key(0), make_block(1000, seed=0))
    flip_byte(store.path_for(make_key(0)), offset_from_end=1)
    calls = []
    monkeypatch.setattr(
        "vllm_llmd.offload.disk_store._checksum", lambda chunk: calls.append(chunk) or ""
    )
    assert [c.key for c in store.scan()] == [make_key(0)]
    assert calls == []


# ---- concurrency -------------------------------------------------------------------------


def slow_write(writer, path: Path, header: bytes, payload: torch.Tensor) -> None:
    """The block file writer, but the file stays half-written for a moment, as on a slow disk
    (one O_DIRECT write is hard to catch half-done)."""
    data = header + payload.numpy().tobytes()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(0.001)
        f.write(data[len(data) // 2 :])


def test_concurrent_writes_and_reads_never_see_a_partial_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(BlockFileWriter, "write", slow_write)
    # few keys, so that writes, reads and deletes of one key collide
    block_bytes = 1 << 16
    fingerprint = make_fingerprint(num_layers=4, page_bytes=block_bytes // 4)
    store = DiskBlockStore(tmp_path, fingerprint, 0, block_bytes)
    keys = [make_key(i) for i in range(4)]
    # every key has 3 versions; a read must return exactly one of them
    versions = {
        key: [make_block(block_bytes, seed=10 * i + v) for v in range(3)]
        for i, key in enumerate(keys)
    }

    def op(n: int) -> str:
        rng = random.Random(n)
        key = rng.choice(keys)
        kind = rng.choices(["write", "read", "delete"], weights=[4, 5, 1])[0]
        if kind == "write":
            store.write(key, rng.choice(versions[key]))
        elif kind == "delete":
            store.delete(key)
        else:
            try:
                data = store.read(key)
            except MissingBlockFileError:
                return "miss"
            assert any(torch.equal(data, v) for v in versions[key]), "read a mixed chunk"
            return "hit"
        return kind

    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = list(pool.map(op, range(200)))  # re-raises any CorruptBlockFileError
    assert outcomes.count("hit") > 20, outcomes
    assert not list(tmp_path.rglob("*.tmp"))
    assert {c.key for c in store.scan()} == {key for key in keys if store.contains(key)}


def test_failing_disk_writes_are_reported_failed_and_logged_once(tmp_path, caplog):
    # A full or broken disk used to fail every spill silently (only a counter moved).
    from vllm_llmd.job_tally import JobKind
    from vllm_llmd.offload.jobs import OffloadStepSpec, SpillJob
    from vllm_llmd.offload.worker import OffloadWorker
    from vllm_llmd.ops.layouts import KVCacheShape

    shape = KVCacheShape(num_layers=2, num_blocks=8, num_heads=2, block_size=4, content=8)
    _, cache = factories.make_paged_cache("LBHNC", shape)
    fingerprint = make_fingerprint(
        num_layers=2, page_bytes=cache.page_bytes, tensor_parallel_size=1
    )
    store = DiskBlockStore(tmp_path / "tier", fingerprint, 0, cache.block_bytes)
    worker = OffloadWorker(cache, num_host_slots=4, disk=store, num_disk_threads=2)
    try:
        (tmp_path / "tier").rename(tmp_path / "gone")
        (tmp_path / "tier").write_bytes(b"")  # a file where the folder was: every write fails
        spills = tuple(SpillJob(make_key(i), i, "") for i in range(4))
        with caplog.at_level(logging.WARNING):
            worker.submit_step(OffloadStepSpec(spills=spills))
            worker.flush_stores()
            deadline = time.monotonic() + 10
            spilled = worker._results.counts
            while len(spilled.get(JobKind.SPILL, {})) < 4 and time.monotonic() < deadline:
                time.sleep(0.02)
        results = worker.take_results().counts[JobKind.SPILL]
        assert all(counts == [0, 1] for counts in results.values()) and len(results) == 4
        failures = [r for r in caplog.records if "disk tier write" in r.getMessage()]
        assert len(failures) == 1, [r.getMessage() for r in failures]
        assert str(tmp_path / "tier") in failures[0].getMessage()
    finally:
        worker.shutdown()


# ---- writing around the page cache -----------------------------------------------------------


def test_a_block_file_is_one_aligned_safetensors_write(tmp_path):
    """Header padded to a page (the format allows spaces), payload page-aligned: one O_DIRECT
    write where the filesystem takes it; safetensors itself reads the file."""
    block_bytes = 4 * ALIGN
    store = DiskBlockStore(
        tmp_path, make_fingerprint(num_layers=4, page_bytes=ALIGN), 0, block_bytes
    )
    block = make_block(block_bytes, seed=3)
    size = store.write(make_key(0), block)
    path = store.path_for(make_key(0))
    assert size == path.stat().st_size and (size - block_bytes) % ALIGN == 0
    with safe_open(path, framework="pt") as f:
        assert torch.equal(f.get_tensor("kv"), block)
    assert torch.equal(store.read(make_key(0)), block)
    assert store._writer.direct in (True, False)  # decided by the filesystem at the first write


def test_a_filesystem_that_refuses_o_direct_gets_buffered_writes(tmp_path, monkeypatch):
    """tmpfs and some network filesystems answer O_DIRECT with EINVAL: the write goes through
    the page cache instead, byte-exact, and later writes do not try again."""
    import errno

    real_open = os.open
    tries = []

    def refusing_open(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            tries.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    block_bytes = 4 * ALIGN
    store = DiskBlockStore(
        tmp_path, make_fingerprint(num_layers=4, page_bytes=ALIGN), 0, block_bytes
    )
    blocks = [make_block(block_bytes, seed=i) for i in range(3)]
    for i, block in enumerate(blocks):
        store.write(make_key(i), block)
    assert len(tries) == (1 if hasattr(os, "O_DIRECT") else 0) and store._writer.direct is False
    for i, block in enumerate(blocks):
        assert torch.equal(store.read(make_key(i)), block)
    assert not list(tmp_path.rglob("*.tmp"))
