"""The disk tier's start-up scans, and the header reader they share with `DiskBlockStore.read`.
The file format and its validation are described in `disk_store`.

Two scans walk the same entries the same way:
- `DiskBlockStore.list_blocks` (what a start uses): names and `stat` only, no file opened. On a
  cold page cache a header read is a random read per file (100k files: 10-16 s here), a stat
  reads the inode tables (a 1.7 s start). The headers are checked later, off the start, by
  `disk_check.StartupHeaderCheck`, and every file is read back whole before its first hit.
- `DiskBlockStore.scan`: opens each file and validates its header too (below).

What the scan looks at: the entries of the root's shard folders (two lowercase hex digits),
by name first, and only regular files (a directory, symlink, FIFO, socket or device named like
a block file was not written by us: it is left alone, and never opened, so a FIFO cannot block
the scan). Per name:

- `<hex>-r<our rank>.safetensors`: listed with its size and mtime (`list_blocks`); or opened (no
  symlink followed), header read with one bounded read, validated (`scan`). Valid: returned. Invalid
  or unreadable (EACCES, EIO, ...): deleted, with the reason logged. Gone meanwhile: skipped. Not
  openable for want of resources (EMFILE, ENFILE, ENOMEM): left in place, not returned, and logged.
- `.<hex>-r<our rank>.<hex>.tmp` older than the grace period: a crashed write's; deleted.
- anything else (other ranks' files, foreign names): left alone, not opened.

No entry and no error of the file system makes the scan raise: a shard folder or the root that
vanishes or cannot be listed is skipped with a warning, and a failed delete is logged.

Speed: `list_blocks` costs one stat per file. In `scan`, each valid file costs four system calls
(open relative to its folder's descriptor, fstat, one pread, close) and one msgspec decode of its
header; the fingerprint is decoded only if its text differs from ours. On machines with 8 or more
cores, the shard folders are scanned by a small thread pool (the system calls release the GIL).
`benchmarks/bench_disk_index.py` measures it.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from vllm_llmd.hashing import BlockHash
from vllm_llmd.log import get_logger

logger = get_logger(__name__)

SUFFIX = ".safetensors"
# Our headers are well under 2 KiB; a larger length field means a damaged or foreign file.
MAX_HEADER_BYTES = 1 << 16
# The first read of a file: enough for the length prefix and any header we write.
_FIRST_READ_BYTES = 4096
# A temp file younger than this may be another process's write in flight (instances of one
# model may share a root); older ones were left by a crash.
TEMP_GRACE_S = 60.0
_TEMP_NAME = re.compile(r"\.([0-9a-f]+)-r([0-9]+)\.[0-9a-f]+\.tmp")
_SHARD_NAME = re.compile(r"[0-9a-f]{2}")
_KEY_HEX = re.compile(r"[0-9a-f]+")
# O_NONBLOCK: opening a FIFO that replaced a block file after the listing must not wait for a
# writer; it changes nothing for regular files. O_NOFOLLOW: we never write symlinks.
OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
# open() errors that say the entry is not a regular file (it changed since the listing)
NOT_A_FILE_ERRNOS = {errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENOTDIR}
# open() errors that say nothing about the file: keep it, a later start can index it
_NO_RESOURCES_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
# Threads pay a GIL hand-off around every system call: with the headers in the page cache and
# few cores they are slower than one thread (2 cores, 100k files: 1.1 s alone, 1.6-2.1 s with
# 2-8 threads); they should pay off where opens wait on the disk and cores are plenty.
_SCAN_THREADS = max(1, min(8, (os.cpu_count() or 1) // 4))


class InvalidBlockFile(Exception):
    """Why a block file failed validation."""


@dataclass(frozen=True, slots=True)
class ScannedBlockFile:
    """A valid block file found by `DiskBlockStore.scan`."""

    key: BlockHash
    # size of the whole file in bytes (header included), as `write` returns it
    size_bytes: int
    # last write, seconds since the epoch (os.stat st_mtime)
    mtime: float
    # the `info` text the block was written with ("" if none)
    info: str = ""


# (parsed header, its length in bytes, the key in hex the file's name says, the file's size)
# -> the header's metadata; raises InvalidBlockFile
HeaderValidator = Callable[[dict[str, Any], int, str, int], dict[str, Any]]


def read_header(fd: int, file_size: int) -> tuple[int, dict[str, Any]]:
    """The safetensors header of the open file `fd`: (its length in bytes, the parsed JSON).
    One read for any header we write; a second only for a larger (foreign) one."""
    head = os.pread(fd, _FIRST_READ_BYTES, 0)
    if len(head) < 8:
        raise InvalidBlockFile(f"file is {file_size} bytes, too short for a header")
    (header_len,) = struct.unpack_from("<Q", head)
    if header_len > MAX_HEADER_BYTES or header_len > file_size - 8:
        raise InvalidBlockFile(f"header length {header_len} does not fit a {file_size}-byte file")
    if 8 + header_len > len(head):
        head += os.pread(fd, 8 + header_len - len(head), len(head))
    raw = head[8 : 8 + header_len]
    try:
        header = msgspec.json.decode(raw) if len(raw) == header_len else None
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, absurd nesting
        header = None
    if not isinstance(header, dict):
        raise InvalidBlockFile("header is not a JSON object")
    return header_len, header


@dataclass
class _ShardOutcome:
    found: list[ScannedBlockFile] = field(default_factory=list)
    deleted: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    # (path, what went wrong): files left in place that we could not open or delete, folders
    # we could not list
    trouble: list[tuple[str, str]] = field(default_factory=list)


def scan_root(root: Path, tp_rank: int, validate: HeaderValidator | None) -> list[ScannedBlockFile]:
    """This rank's valid block files under `root`, oldest write first; deletes this rank's
    invalid files and stale temp files, and logs what it deleted and why. Without `validate`,
    no file is opened: every block file named as ours is returned, with no `info`."""
    try:
        with os.scandir(root) as entries:
            shards = [e.path for e in entries if _SHARD_NAME.fullmatch(e.name) and _is_dir(e)]
    except OSError as exc:
        logger.warning("disk offload scan: cannot list %s (%s); starting empty", root, exc)
        return []
    scanner = _ShardScanner(tp_rank, validate)
    if _SCAN_THREADS > 1 and len(shards) > 1:
        with ThreadPoolExecutor(min(_SCAN_THREADS, len(shards))) as pool:
            outcomes = list(pool.map(scanner.scan_shard, shards))
    else:
        outcomes = [scanner.scan_shard(shard) for shard in shards]
    found: list[ScannedBlockFile] = []
    deleted: list[tuple[str, str]] = []
    trouble: list[tuple[str, str]] = []
    for outcome in outcomes:
        found += outcome.found
        deleted += outcome.deleted
        trouble += outcome.trouble
    for path, reason in deleted:
        logger.debug("deleted %s: %s", path, reason)
    if deleted:
        path, reason = deleted[0]
        logger.warning(
            "disk offload scan of %s: kept %d block files, deleted %d invalid ones (first: %s: %s)",
            root,
            len(found),
            len(deleted),
            os.path.basename(path),
            reason,
        )
    if trouble:
        path, reason = trouble[0]
        logger.warning(
            "disk offload scan of %s: %d files or folders could not be read or deleted and "
            "were left in place (first: %s: %s)",
            root,
            len(trouble),
            path,
            reason,
        )
    found.sort(key=lambda block: block.mtime)
    return found


class _ShardScanner:
    def __init__(self, tp_rank: int, validate: HeaderValidator | None) -> None:
        self.tp_rank = tp_rank
        self.validate = validate
        self.block_suffix = f"-r{tp_rank}{SUFFIX}"

    def scan_shard(self, shard_path: str) -> _ShardOutcome:
        outcome = _ShardOutcome()
        shard = _Shard(shard_path, os.path.basename(shard_path), -1)
        try:
            # names relative to the folder's descriptor: shorter lookups, and immune to a
            # rename of the root mid-scan
            shard.fd = os.open(shard_path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                with os.scandir(shard.fd) as entries:
                    for entry in entries:
                        self._scan_entry(entry, shard, outcome)
            finally:
                os.close(shard.fd)
        except FileNotFoundError:
            pass  # the folder vanished: nothing left to index in it
        except OSError as exc:  # cannot list it (EACCES, replaced by a file, EIO)
            outcome.trouble.append((shard_path, f"cannot list folder: {exc}"))
        return outcome

    def _scan_entry(self, entry: os.DirEntry[str], shard: _Shard, out: _ShardOutcome) -> None:
        name = entry.name
        if name.endswith(self.block_suffix):
            key_hex = name[: -len(self.block_suffix)]
            if not _KEY_HEX.fullmatch(key_hex) or not _is_regular_file(entry):
                return  # not a block file of ours
            if len(key_hex) % 2 or key_hex[:2] != shard.name:
                _delete(shard, name, "file name does not match its shard folder", out)
                return
            if self.validate is None:
                _list_block_file(entry, key_hex, out)
            else:
                self._scan_block_file(shard, name, key_hex, out, self.validate)
        elif name.startswith(".") and name.endswith(".tmp"):
            temp = _TEMP_NAME.fullmatch(name)
            if temp is None or int(temp.group(2)) != self.tp_rank or not _is_regular_file(entry):
                return
            try:
                age_s = time.time() - entry.stat(follow_symlinks=False).st_mtime
            except OSError:
                return  # the write finished meanwhile
            if age_s >= TEMP_GRACE_S:
                _delete(shard, name, "leftover temp file", out)

    def _scan_block_file(
        self,
        shard: _Shard,
        name: str,
        key_hex: str,
        out: _ShardOutcome,
        validate: HeaderValidator,
    ) -> None:
        try:
            fd = os.open(name, OPEN_FLAGS, dir_fd=shard.fd)
        except FileNotFoundError:
            return  # deleted meanwhile
        except OSError as exc:
            if exc.errno in NOT_A_FILE_ERRNOS:
                return  # replaced by something that is not a file since the listing
            if exc.errno in _NO_RESOURCES_ERRNOS:
                out.trouble.append((os.path.join(shard.path, name), f"cannot open: {exc}"))
            else:  # EACCES, EIO, ...: never readable as it is
                _delete(shard, name, f"cannot open: {exc}", out)
            return
        try:
            opened = os.fstat(fd)
            if not stat.S_ISREG(opened.st_mode):
                return  # a FIFO or device swapped in since the listing
            try:
                header_len, header = read_header(fd, opened.st_size)
                metadata = validate(header, header_len, key_hex, opened.st_size)
            except (InvalidBlockFile, OSError) as exc:
                _delete(shard, name, str(exc), out, opened)
                return
        finally:
            os.close(fd)
        key = BlockHash(bytes.fromhex(key_hex))
        info = metadata.get("info", "")
        out.found.append(ScannedBlockFile(key, opened.st_size, opened.st_mtime, info))


def _list_block_file(entry: os.DirEntry[str], key_hex: str, out: _ShardOutcome) -> None:
    try:
        listed = entry.stat(follow_symlinks=False)
    except OSError:
        return  # deleted meanwhile (or unreadable: the check that opens it will say so)
    if stat.S_ISREG(listed.st_mode):
        key = BlockHash(bytes.fromhex(key_hex))
        out.found.append(ScannedBlockFile(key, listed.st_size, listed.st_mtime))


@dataclass(slots=True)
class _Shard:
    """A shard folder being scanned."""

    path: str
    name: str
    fd: int


def _delete(
    shard: _Shard,
    name: str,
    reason: str,
    out: _ShardOutcome,
    opened: os.stat_result | None = None,
) -> None:
    """Delete `name` in `shard`, recording why; if `opened` is given, only if the name still
    holds the file we opened (a writer may have replaced it with a good one meanwhile)."""
    path = os.path.join(shard.path, name)
    try:
        if opened is not None:
            current = os.stat(name, dir_fd=shard.fd, follow_symlinks=False)
            if (current.st_ino, current.st_dev) != (opened.st_ino, opened.st_dev):
                return
        os.unlink(name, dir_fd=shard.fd)
    except FileNotFoundError:
        pass  # gone already: as good as deleted
    except OSError as exc:  # e.g. a folder we may not write to
        out.trouble.append((path, f"{reason}, and cannot delete it: {exc}"))
        return
    out.deleted.append((path, reason))


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _is_regular_file(entry: os.DirEntry[str]) -> bool:
    # from the listing's d_type where the file system reports it: no extra system call
    try:
        return entry.is_file(follow_symlinks=False)
    except OSError:
        return False
