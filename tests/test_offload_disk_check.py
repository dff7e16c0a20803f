"""A start indexes the disk tier by name (`DiskBlockStore.list_blocks`), and the headers of what
it found are checked in the background (`StartupHeaderCheck`), then applied by the scheduler
half at its next steps: valid blocks announced with their tokens, invalid files out of the index
and off the disk. Real files under tmp_path, the real planner and manager."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from disk_harness import make_block, make_fingerprint, make_key, make_store, set_mtime

from vllm_llmd.connector.config import LLMDConnectorConfig
from vllm_llmd.connector.connector import make_offload_planner
from vllm_llmd.connector.metadata import LLMDConnectorMetadata
from vllm_llmd.offload import disk_scan
from vllm_llmd.offload.disk_check import StartupHeaderCheck
from vllm_llmd.offload.disk_store import (
    CorruptBlockFileError,
    DiskBlockStore,
    MissingBlockFileError,
)
from vllm_llmd.offload.manager import OffloadManager
from vllm_llmd.offload.paths import disk_tier_folder
from vllm_llmd.offload.records import OffloadTier, TierEvent


def write(store: DiskBlockStore, i: int) -> Path:
    store.write(make_key(i), make_block(store.block_bytes, seed=i), info=f"block {i}")
    return store.path_for(make_key(i))


def corrupt_header(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage{[")


def wait_done(check: StartupHeaderCheck) -> None:
    deadline = time.monotonic() + 20
    while not check.done and time.monotonic() < deadline:
        time.sleep(0.01)
    assert check.done


# ---- list_blocks: by name and stat, no file opened -----------------------------------------


def test_list_blocks_opens_no_file_and_keeps_what_only_a_header_read_would_refuse(
    tmp_path, monkeypatch
):
    store = make_store(tmp_path)
    now = time.time()
    paths = [write(store, i) for i in range(3)]
    corrupt_header(paths[1])
    for i, path in enumerate(paths):
        set_mtime(path, now - 100 + i)
    other_rank = write(make_store(tmp_path, tp_rank=1), 7)
    stale_temp = paths[0].parent / f".{make_key(0).hex()}-r0.0123abcd.tmp"
    stale_temp.write_bytes(b"half a write")
    set_mtime(stale_temp, now - 3600)
    fifo = store.path_for(make_key(5))
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    real_open = os.open

    def no_block_file_open(path, *args, **kwargs):
        assert not str(path).endswith(".safetensors"), f"list_blocks opened {path}"
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(disk_scan.os, "open", no_block_file_open)
    listed = store.list_blocks()
    # oldest first, sizes from stat, no info (the header is unread); the FIFO is not a file
    assert [(b.key, b.info) for b in listed] == [(make_key(i), "") for i in range(3)]
    assert [b.size_bytes for b in listed] == [p.stat().st_size for p in paths]
    assert not stale_temp.exists() and other_rank.exists() and paths[1].exists()


# ---- check_header -----------------------------------------------------------------------


def test_check_header_returns_the_info_and_deletes_an_invalid_file(tmp_path):
    store = make_store(tmp_path)
    good, bad = write(store, 0), write(store, 1)
    corrupt_header(bad)
    assert store.check_header(make_key(0)) == "block 0"
    with pytest.raises(CorruptBlockFileError, match="header is not a JSON object; deleted"):
        store.check_header(make_key(1))
    assert good.exists() and not bad.exists()
    with pytest.raises(MissingBlockFileError):
        store.check_header(make_key(1))


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_check_header_and_read_leave_what_is_not_a_file_alone(tmp_path, kind):
    store = make_store(tmp_path)
    path = store.path_for(make_key(0))
    path.parent.mkdir()
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(write(make_store(tmp_path / "elsewhere"), 0))
    errors: list[Exception] = []

    def check() -> None:
        for method in (store.check_header, store.read):
            try:
                method(make_key(0))
            except CorruptBlockFileError as exc:
                errors.append(exc)

    checker = threading.Thread(target=check, daemon=True)
    checker.start()
    checker.join(timeout=20)
    if checker.is_alive():  # blocked opening the FIFO: release it
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("blocked on a FIFO")
    assert len(errors) == 2 and all("not a regular file" in str(e) for e in errors)
    assert os.path.lexists(path)


# ---- StartupHeaderCheck -------------------------------------------------------------------


def test_the_check_reports_every_block_newest_first_and_deletes_invalid_files(tmp_path):
    ranks = [make_store(tmp_path, tp_rank=r) for r in range(2)]
    for store in ranks:
        for i in range(4):
            write(store, i)
    corrupt_header(ranks[1].path_for(make_key(2)))  # rank 1's part of block 2
    ranks[0].delete(make_key(3))  # gone since the listing: not reported
    check = StartupHeaderCheck(ranks, [make_key(i) for i in range(4)])
    wait_done(check)
    assert check.take() == [
        (make_key(2), None),
        (make_key(1), "block 1"),
        (make_key(0), "block 0"),
    ]
    assert check.take() == []
    assert not ranks[1].path_for(make_key(2)).exists()


def test_the_check_stops_when_closed(tmp_path, monkeypatch):
    store = make_store(tmp_path)
    write(store, 0)

    calls: list[bytes] = []

    def slow_check(key: bytes) -> str:
        calls.append(key)
        time.sleep(0.05)  # a cold disk: 200 files would take 10 s
        return "block"

    monkeypatch.setattr(store, "check_header", slow_check)
    check = StartupHeaderCheck([store], [make_key(i) for i in range(200)])
    deadline = time.monotonic() + 10
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    check.close()
    assert check.done and time.monotonic() - started < 1.0
    assert 0 < len(check.take()) < 200


# ---- the manager applies the results ------------------------------------------------------


def test_the_manager_announces_checked_blocks_and_forgets_invalid_ones():
    m = OffloadManager(num_host_slots=2, num_disk_blocks=10)
    keys = [make_key(i) for i in range(4)]
    m.add_disk_blocks((k, "") for k in keys)
    assert m.take_events() == []  # nothing honest to announce before the header is read
    assert m.prepare_verify(keys[3:]) == 1  # a read-back of block 3 is in flight
    m.describe_disk_blocks([(keys[0], "info 0"), (keys[1], None), (keys[3], None)])
    assert m.take_events() == [TierEvent(keys[0], OffloadTier.DISK, True, "info 0")]
    assert m.lookup(keys[:1]) == (0, 1) and m.lookup(keys[1:2]) == (0, 0)
    # block 3 is left to its read-back, which fails on the bad file and says so
    assert m.lookup(keys[3:]) == (0, 1)
    m.take_plan()
    m.complete_verify(keys[3:], success=False)
    assert m.lookup(keys[3:]) == (0, 0) and m.num_on_disk() == 2 and m.num_pinned() == 0
    assert m.take_events() == []  # never announced: no removal to announce either
    m.describe_disk_blocks([(keys[0], "info 0")])  # said once
    assert m.take_events() == []


def test_a_start_indexes_by_name_and_the_steps_apply_the_check(tmp_path):
    fingerprint = make_fingerprint()  # TP 2: a block is whole only with both ranks' files
    block_bytes = fingerprint.num_layers * fingerprint.page_bytes
    config = LLMDConnectorConfig(
        host_offload_bytes=4 * 2 * block_bytes,
        disk_offload_path=str(tmp_path),
        disk_offload_bytes=16 * 2 * block_bytes,
    )
    folder = disk_tier_folder(tmp_path, fingerprint)
    ranks = [DiskBlockStore(folder, fingerprint, r, block_bytes) for r in range(2)]
    for store in ranks:
        for i in range(5):
            write(store, i)
    corrupt_header(ranks[0].path_for(make_key(1)))
    for store in ranks:
        for i in range(5):
            set_mtime(store.path_for(make_key(i)), time.time() - 100 + i)
    ranks[1].delete(make_key(4))  # half a block: never indexed
    planner = make_offload_planner(config, fingerprint, publish_events=True)
    assert planner is not None
    try:
        keys = [make_key(i) for i in range(5)]
        assert planner.manager.num_on_disk() == 4  # the corrupt file too, until checked
        deadline = time.monotonic() + 20
        events: list[TierEvent] = []
        while time.monotonic() < deadline:
            planner.take_step(LLMDConnectorMetadata())
            events += planner.take_events()
            if planner.manager.num_on_disk() == 3 and len(events) == 3:
                break
            time.sleep(0.01)
        assert planner.manager.lookup(keys[:1]) == (0, 1)
        assert planner.manager.lookup(keys[1:2]) == (0, 0)
        assert planner.manager.disk_keys() == [keys[0], keys[2], keys[3]]
        assert not ranks[0].path_for(keys[1]).exists()
        stored = {e.key: e.info for e in events if e.stored}
        assert stored == {keys[i]: f"block {i}" for i in (0, 2, 3)}
    finally:
        planner.close()
