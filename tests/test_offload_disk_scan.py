"""The disk tier's start-up scan against hostile files and file-system errors: no content of
the folder makes it raise. Real files under tmp_path; errors the file system would give are
injected where they cannot be made for real (running as root)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from disk_harness import make_block, make_key, make_store, set_mtime

from vllm_llmd.offload import disk_scan
from vllm_llmd.offload.disk_store import (
    DiskBlockStore,
)

# ---- scan: hostile files and file-system errors ------------------------------------------
# Every case must leave scan() standing: the file is deleted with a reason when it has our
# name and rank, or left alone when it is not a regular file, or skipped when it is gone.


@pytest.fixture
def scan_log(caplog):
    """caplog, listening on the scan's logger (see test_scan_deletes_invalid_files_...)."""
    disk_scan.logger.addHandler(caplog.handler)
    caplog.set_level(logging.DEBUG, logger=disk_scan.logger.name)
    yield caplog
    disk_scan.logger.removeHandler(caplog.handler)


def header_of(path: Path) -> tuple[dict, bytes]:
    """A block file's parsed header and its payload."""
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header_len]), data[8 + header_len :]


def write_raw(path: Path, header: object, payload: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + payload)


def with_good_file(store: DiskBlockStore, i: int = 0) -> Path:
    store.write(make_key(i), make_block(store.block_bytes, seed=i), info=f"block {i}")
    return store.path_for(make_key(i))


def edit(path: str, value: object) -> Callable[[dict], None]:
    """Set `header[a][b] = value` for path "a.b" (a missing value deletes the field)."""

    def apply(header: dict) -> None:
        *parents, last = path.split(".")
        target = header
        for name in parents:
            target = target[name]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value

    return apply


_DELETE = object()


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (edit("__metadata__", _DELETE), "no metadata in header"),
        (edit("__metadata__", "text"), "no metadata in header"),
        (edit("__metadata__.format_version", "1"), "format version '1'"),
        (edit("__metadata__.fingerprint", _DELETE), "no fingerprint in metadata"),
        (edit("__metadata__.fingerprint", "{not json"), "undecodable fingerprint"),
        (edit("__metadata__.key", make_key(1).hex()), "holds key"),
        (edit("__metadata__.tp_rank", "1"), "written by tp_rank '1'"),
        (edit("__metadata__.checksum", "abc"), "bad checksum field"),
        (edit("__metadata__.info", 5), "info field 5 is not text"),
        (edit("kv.dtype", "F16"), "expected only"),
        (edit("kv.shape", [999]), "expected only"),
        (edit("kv.data_offsets", [1, 1001]), "expected only"),
        (edit("extra", {"dtype": "U8", "shape": [0], "data_offsets": [1000, 1000]}), "extra"),
    ],
)
def test_scan_deletes_a_file_with_a_wrong_header_field(tmp_path, scan_log, mutate, reason):
    store = make_store(tmp_path)
    path = with_good_file(store)
    header, payload = header_of(path)
    mutate(header)
    write_raw(path, header, payload)
    assert store.scan() == []
    assert not path.exists()
    assert reason in scan_log.text


def test_scan_keeps_a_fingerprint_spelled_differently_but_equal(tmp_path):
    # the raw-string comparison is a shortcut: an equal fingerprint in other JSON is still ours
    store = make_store(tmp_path)
    path = with_good_file(store)
    header, payload = header_of(path)
    fields = json.loads(header["__metadata__"]["fingerprint"])
    header["__metadata__"]["fingerprint"] = json.dumps(dict(reversed(fields.items())), indent=1)
    write_raw(path, header, payload)
    assert [c.key for c in store.scan()] == [make_key(0)]
    assert torch.equal(store.read(make_key(0)), make_block(1000, seed=0))


def test_scan_and_read_take_a_header_longer_than_the_first_read(tmp_path):
    store = make_store(tmp_path)
    info = "tokens " * 2000  # a 14 KB header: past the scan's first 4 KiB read
    store.write(make_key(0), make_block(1000, seed=0), info=info)
    assert [(c.key, c.info) for c in store.scan()] == [(make_key(0), info)]
    assert torch.equal(store.read(make_key(0)), make_block(1000, seed=0))


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "file is 0 bytes, too short for a header"),
        (b"\x01" * 7, "file is 7 bytes, too short for a header"),
        (b"\xff" * 8 + b"{}" + bytes(1000), "header length 18446744073709551615 does not fit"),
        ((1 << 20).to_bytes(8, "little") + b"{}" * (1 << 19), "header length 1048576"),
        ((500).to_bytes(8, "little") + b'{"a": 1}', "header length 500 does not fit"),
        ((64).to_bytes(8, "little") + b"\xff\xfe" * 32 + bytes(1000), "not a JSON object"),
        ((2).to_bytes(8, "little") + b"[]" + bytes(1000), "not a JSON object"),
        ((6).to_bytes(8, "little") + b'{"a":}' + bytes(1000), "not a JSON object"),
        ((60000).to_bytes(8, "little") + b"[" * 30000 + b"]" * 30000, "not a JSON object"),
    ],
    ids=["empty", "short", "huge-length", "over-64KiB", "length-past-end", "non-utf8",
         "json-list", "bad-json", "deep-nesting"],
)  # fmt: skip
def test_scan_deletes_a_file_with_a_broken_header(tmp_path, scan_log, content, reason):
    store = make_store(tmp_path)
    path = store.path_for(make_key(0))
    path.parent.mkdir()
    path.write_bytes(content)
    assert store.scan() == []
    assert not path.exists()
    assert reason in scan_log.text


def make_not_a_file(kind: str, path: Path, target: Path) -> None:
    if kind == "directory":
        path.mkdir()
        (path / "inside").write_bytes(b"x")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(target)


@pytest.mark.parametrize("listing_knows", [True, False], ids=["listed", "swapped-in"])
@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink"])
def test_scan_leaves_entries_that_are_not_files_alone(tmp_path, monkeypatch, kind, listing_knows):
    # "swapped-in": the entry became a non-file after the listing said file (the listing's
    # answer is faked), so the open and fstat must catch it
    store = make_store(tmp_path / "root")
    target = with_good_file(make_store(tmp_path / "elsewhere"), i=1)
    path = store.path_for(make_key(0))
    path.parent.mkdir()
    make_not_a_file(kind, path, target)
    temp = path.parent / f".{make_key(0).hex()}-r0.0123abcd.tmp"
    make_not_a_file(kind, temp, target)
    if kind != "symlink":  # (utime follows symlinks)
        set_mtime(temp, time.time() - 3600)
    opened: list[str] = []
    if listing_knows:  # then it is not even opened
        fail_open_of(monkeypatch, path.name, opened.append)
    else:
        monkeypatch.setattr(disk_scan, "_is_regular_file", lambda entry: True)
    scanned: list = []
    scanner = threading.Thread(target=lambda: scanned.append(store.scan()), daemon=True)
    scanner.start()
    scanner.join(timeout=20)
    if scanner.is_alive() and kind == "fifo":  # blocked opening the FIFO: release it
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("scan blocked on a FIFO")
    assert scanned == [[]] and opened == []
    assert os.path.lexists(path)
    if listing_knows:  # (a temp name is deleted by name: harmless for a FIFO or symlink)
        assert os.path.lexists(temp)
    assert [c.key for c in make_store(tmp_path / "elsewhere").scan()] == [make_key(1)]


@pytest.mark.parametrize("threads", [1, 4])
def test_scan_serial_or_threaded_finds_the_same(tmp_path, monkeypatch, threads):
    # the thread pool only runs on machines of 8+ cores: force it here
    monkeypatch.setattr(disk_scan, "_SCAN_THREADS", threads)
    store = make_store(tmp_path)
    paths = [with_good_file(store, i) for i in range(20)]
    for age, path in enumerate(reversed(paths)):
        set_mtime(path, time.time() - 100 - age)
    os.truncate(paths[3], 20)
    assert [c.key for c in store.scan()] == [make_key(i) for i in range(20) if i != 3]
    assert not paths[3].exists()


def test_scan_skips_a_file_where_a_shard_folder_should_be(tmp_path):
    store = make_store(tmp_path)
    with_good_file(store)
    (tmp_path / "ab").write_bytes(b"not a folder")
    assert [c.key for c in store.scan()] == [make_key(0)]
    assert (tmp_path / "ab").read_bytes() == b"not a folder"


def test_scan_of_a_vanished_root_is_empty(tmp_path, scan_log):
    store = make_store(tmp_path / "root")
    with_good_file(store)
    shutil.rmtree(tmp_path / "root")
    assert store.scan() == []
    assert "cannot list" in scan_log.text


def fail_open_of(monkeypatch, name_part: str, action: Callable[[str], None]) -> None:
    """Make os.open run `action(path)` (which may raise) before opening names containing
    name_part, as the scan opens them (relative to a folder's descriptor)."""
    real_open = os.open

    def fake_open(path, flags, mode=0o777, *, dir_fd=None):
        if name_part in os.fspath(path):
            full = os.path.join(f"/proc/self/fd/{dir_fd}", path) if dir_fd is not None else path
            action(os.path.realpath(full))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(disk_scan.os, "open", fake_open)


def raise_errno(code: int) -> Callable[[str], None]:
    def action(path: str) -> None:
        raise OSError(code, os.strerror(code), path)

    return action


def test_scan_skips_a_file_that_vanishes_mid_scan(tmp_path, monkeypatch, scan_log):
    store = make_store(tmp_path)
    vanishing, kept = with_good_file(store, 0), with_good_file(store, 1)
    fail_open_of(monkeypatch, vanishing.name, os.unlink)
    assert [c.key for c in store.scan()] == [make_key(1)]
    assert kept.exists() and "deleted" not in scan_log.text


def remove_folder(path: str) -> None:
    for name in os.listdir(path):  # (shutil.rmtree would call the faked os.open)
        os.unlink(os.path.join(path, name))
    os.rmdir(path)


def test_scan_skips_a_shard_folder_that_vanishes_mid_scan(tmp_path, monkeypatch):
    store = make_store(tmp_path)
    vanishing, kept = with_good_file(store, 0), with_good_file(store, 1)
    assert vanishing.parent != kept.parent
    fail_open_of(monkeypatch, str(vanishing.parent), remove_folder)
    assert [c.key for c in store.scan()] == [make_key(1)]


@pytest.mark.parametrize("code", [errno.EACCES, errno.EIO])
def test_scan_deletes_a_file_it_can_never_open(tmp_path, monkeypatch, scan_log, code):
    store = make_store(tmp_path)
    path = with_good_file(store)
    fail_open_of(monkeypatch, path.name, raise_errno(code))
    assert store.scan() == []
    assert not path.exists()
    assert f"cannot open: [Errno {code}]" in scan_log.text


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_scan_deletes_an_unreadable_file(tmp_path, scan_log):
    store = make_store(tmp_path)
    path = with_good_file(store)
    path.chmod(0)
    assert store.scan() == []
    assert not path.exists() and "Permission denied" in scan_log.text


def test_scan_keeps_files_it_cannot_open_for_want_of_descriptors(tmp_path, monkeypatch, scan_log):
    store = make_store(tmp_path)
    path = with_good_file(store)
    fail_open_of(monkeypatch, path.name, raise_errno(errno.EMFILE))
    assert store.scan() == []
    assert path.exists()  # nothing wrong with the file: a later start indexes it
    assert "could not be read or deleted and were left in place" in scan_log.text
    monkeypatch.undo()
    assert [c.key for c in store.scan()] == [make_key(0)]


def test_scan_deletes_a_file_whose_header_read_fails(tmp_path, monkeypatch, scan_log):
    store = make_store(tmp_path)
    path = with_good_file(store)

    def failing_pread(fd: int, n: int, offset: int) -> bytes:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(disk_scan.os, "pread", failing_pread)
    assert store.scan() == []
    monkeypatch.undo()
    assert not path.exists() and "Input/output error" in scan_log.text


def test_scan_survives_a_delete_that_fails(tmp_path, monkeypatch, scan_log):
    store = make_store(tmp_path)
    path = with_good_file(store)
    os.truncate(path, 20)

    def failing_unlink(path, *, dir_fd=None):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(disk_scan.os, "unlink", failing_unlink)
    assert store.scan() == []
    assert path.exists()
    assert "and cannot delete it: [Errno 13] Permission denied" in scan_log.text


def test_scan_does_not_delete_a_file_replaced_after_it_was_opened(tmp_path, monkeypatch):
    # a writer's os.replace between our open and our delete: the new file is good, keep it
    store = make_store(tmp_path)
    path = with_good_file(store)
    os.truncate(path, 20)
    real_pread = os.pread

    def pread_then_replace(fd: int, n: int, offset: int) -> bytes:
        data = real_pread(fd, n, offset)
        monkeypatch.setattr(disk_scan.os, "pread", real_pread)
        with_good_file(store)
        return data

    monkeypatch.setattr(disk_scan.os, "pread", pread_then_replace)
    assert store.scan() == []  # the file it opened was invalid
    assert [c.key for c in store.scan()] == [make_key(0)]  # the replacement survived
