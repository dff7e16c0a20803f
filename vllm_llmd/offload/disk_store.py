"""The disk tier's bytes: one safetensors file per block (one vLLM block, all layers, one worker).

Layout under the configured root, sharded by the key's first two hex digits so that no folder
grows past a few thousand entries:

    root/ab/abcdef…-r0.safetensors          key hex, "-r" + tp_rank
    root/ab/.abcdef…-r0.<random>.tmp        a write in progress (or left by a crash)

Each file is a standard safetensors file (written by `safetensors.torch.save_file`):

    u64 little-endian N | N bytes of JSON header | payload (block_bytes)

with one tensor, "kv" (dtype U8, shape [block_bytes]), and string metadata:

    format_version   FORMAT_VERSION
    fingerprint      msgspec JSON of the writer's KVLayoutFingerprint
    key              the key (vLLM block hash) in hex
    tp_rank          the writer's tensor-parallel rank
    checksum         blake2b of the payload, 16-byte digest, hex
    info             the caller's description of the block (opaque text; e.g. the tokens and
                     parent hash a KV event needs), returned by `scan`

Validation. `scan` (warm restart) reads only headers: format version, fingerprint, key (it must
match the file's name and shard), tp_rank, tensor dtype/shape/offsets and the file's size.
`read` checks all of that again and the payload's checksum, so bytes corrupted after the scan
are caught. A file that fails is deleted and never returned. Files of other tp_ranks belong to
the other workers sharing the folder: they are neither opened nor deleted. Files whose names
are not ours are left alone. A root holds one model's blocks: a file with another fingerprint
is deleted, so give each model (fingerprint) its own root.

Concurrency. A write goes to a uniquely named temp file in the target's folder, then
`os.replace` renames it over the target: readers see the old file, no file, or the new file,
never a partial one. A reader reads header and payload from one open file descriptor, so a
concurrent replace or delete does not mix two files. Writes are not fsync'ed: the cache is
best-effort, and a file torn by a power loss fails the size or checksum check.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import msgspec
import torch
from safetensors.torch import save_file

from vllm_llmd.hashing import BlockHash
from vllm_llmd.kv_layout import KVLayoutFingerprint
from vllm_llmd.log import get_logger

logger = get_logger(__name__)

# Version history:
#   1: first version (one U8 tensor "kv"; fingerprint, key, tp_rank, blake2b-128 checksum).
FORMAT_VERSION = 1
TENSOR_NAME = "kv"
# Our headers are well under 2 KiB; a larger length field means a damaged or foreign file.
_MAX_HEADER_BYTES = 1 << 16
_CHECKSUM_BYTES = 16
# A temp file younger than this may be another process's write in flight (instances of one
# model may share a root); older ones were left by a crash.
_TEMP_GRACE_S = 60.0
_SUFFIX = ".safetensors"
_BLOCK_FILE_NAME = re.compile(r"([0-9a-f]+)-r(\d+)\.safetensors")
_TEMP_NAME = re.compile(r"\.([0-9a-f]+)-r(\d+)\.[0-9a-f]+\.tmp")
_SHARD_NAME = re.compile(r"[0-9a-f]{2}")


class CorruptBlockFileError(RuntimeError):
    """A block cannot be read: its file failed validation (and has been deleted) or is
    missing (`MissingBlockFileError`). Either way the caller treats the block as a miss."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"block file {path}: {reason}")
        self.path = path
        self.reason = reason


class MissingBlockFileError(CorruptBlockFileError):
    """The block file does not exist (deleted by someone else, or never written)."""


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


class _Invalid(Exception):
    """Internal: why a file failed validation."""


class DiskBlockStore:
    """One worker's block files under `root`. Thread-safe for different keys; a concurrent
    write and read (or delete) of the same key is safe too (see the module docstring)."""

    def __init__(
        self, root: Path, fingerprint: KVLayoutFingerprint, tp_rank: int, block_bytes: int
    ) -> None:
        expected_bytes = fingerprint.num_layers * fingerprint.page_bytes
        if block_bytes <= 0 or block_bytes != expected_bytes:
            raise ValueError(
                f"block_bytes={block_bytes} must equal num_layers * page_bytes "
                f"= {fingerprint.num_layers} * {fingerprint.page_bytes} = {expected_bytes}"
            )
        if not 0 <= tp_rank < fingerprint.tensor_parallel_size:
            raise ValueError(
                f"tp_rank={tp_rank} is outside tensor_parallel_size="
                f"{fingerprint.tensor_parallel_size}"
            )
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.tp_rank = tp_rank
        self.block_bytes = block_bytes
        self._fingerprint_json = msgspec.json.encode(fingerprint).decode()
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, key: BlockHash) -> Path:
        if not key:
            raise ValueError("block key must be non-empty bytes")
        key_hex = key.hex()
        return self.root / key_hex[:2] / f"{key_hex}-r{self.tp_rank}{_SUFFIX}"

    def contains(self, key: BlockHash) -> bool:
        return self.path_for(key).is_file()

    def write(self, key: BlockHash, block: torch.Tensor, info: str = "") -> int:
        """Store `block` (uint8, block_bytes, contiguous, on CPU) under `key`, replacing any
        file there, with an opaque `info` text that `scan` returns. Returns the file's size."""
        self._check_buffer(block, "block")
        block = block.view(-1)
        path = self.path_for(key)
        metadata = {
            "format_version": str(FORMAT_VERSION),
            "fingerprint": self._fingerprint_json,
            "key": key.hex(),
            "tp_rank": str(self.tp_rank),
            "checksum": _checksum(block),
            "info": info,
        }
        path.parent.mkdir(exist_ok=True)
        temp = path.parent / f".{path.name[: -len(_SUFFIX)]}.{uuid.uuid4().hex}.tmp"
        try:
            save_file({TENSOR_NAME: block}, temp, metadata=metadata)
            size = temp.stat().st_size
            os.replace(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return size

    def read(self, key: BlockHash, out: torch.Tensor | None = None) -> torch.Tensor:
        """The validated payload of `key`, in `out` if given (uint8, block_bytes, contiguous,
        on CPU; may be pinned), else in a new tensor.

        Raises:
            MissingBlockFileError: there is no file for `key`.
            CorruptBlockFileError: the file failed validation; it has been deleted.
        """
        if out is None:
            out = torch.empty(self.block_bytes, dtype=torch.uint8)
        self._check_buffer(out, "out")
        path = self.path_for(key)
        try:
            f = open(path, "rb", buffering=0)
        except FileNotFoundError:
            raise MissingBlockFileError(path, "no such file") from None
        with f:
            stat = os.fstat(f.fileno())
            try:
                metadata = self._validate_header(f, key, stat.st_size)
                _read_exactly(f, memoryview(out.view(-1).numpy()))
                if _checksum(out) != metadata["checksum"]:
                    raise _Invalid("payload checksum mismatch")
            except (_Invalid, OSError) as exc:
                _discard(path, stat)
                raise CorruptBlockFileError(path, f"{exc}; deleted") from None
        return out

    def delete(self, key: BlockHash) -> None:
        self.path_for(key).unlink(missing_ok=True)

    def scan(self) -> list[ScannedBlockFile]:
        """Rebuild the index at start-up: this rank's valid blocks, oldest write first.

        Reads headers only (the checksum is checked by `read`). Deletes this rank's invalid
        files and stale temp files; logs what it deleted and why.
        """
        found: list[ScannedBlockFile] = []
        deleted: list[tuple[Path, str]] = []
        for shard in os.scandir(self.root):
            if not (shard.is_dir() and _SHARD_NAME.fullmatch(shard.name)):
                continue
            for entry in os.scandir(shard.path):
                block, delete_reason = self._scan_entry(entry)
                if block is not None:
                    found.append(block)
                elif delete_reason is not None:
                    Path(entry.path).unlink(missing_ok=True)
                    deleted.append((Path(entry.path), delete_reason))
        for path, reason in deleted:
            logger.debug("deleted %s: %s", path, reason)
        if deleted:
            path, reason = deleted[0]
            logger.warning(
                "disk offload scan of %s: kept %d block files, deleted %d invalid ones "
                "(first: %s: %s)",
                self.root,
                len(found),
                len(deleted),
                path.name,
                reason,
            )
        found.sort(key=lambda block: block.mtime)
        return found

    def _scan_entry(self, entry: os.DirEntry) -> tuple[ScannedBlockFile | None, str | None]:
        """(the block if valid and ours, else None; why to delete the file, or None to keep)."""
        temp = _TEMP_NAME.fullmatch(entry.name)
        if temp:
            if int(temp.group(2)) != self.tp_rank:
                return None, None
            try:
                age_s = time.time() - entry.stat().st_mtime
            except FileNotFoundError:
                return None, None  # the write finished meanwhile
            return None, ("leftover temp file" if age_s >= _TEMP_GRACE_S else None)
        name = _BLOCK_FILE_NAME.fullmatch(entry.name)
        if not name or int(name.group(2)) != self.tp_rank:
            return None, None  # not a block file, or another worker's
        key_hex = name.group(1)
        if len(key_hex) % 2 or Path(entry.path).parent.name != key_hex[:2]:
            return None, "file name does not match its shard folder"
        key = BlockHash(bytes.fromhex(key_hex))
        try:
            with open(entry.path, "rb", buffering=0) as f:
                stat = os.fstat(f.fileno())
                metadata = self._validate_header(f, key, stat.st_size)
        except FileNotFoundError:
            return None, None  # deleted meanwhile
        except (_Invalid, OSError) as exc:
            return None, str(exc)
        return ScannedBlockFile(key, stat.st_size, stat.st_mtime, metadata.get("info", "")), None

    def _validate_header(self, f: BinaryIO, key: BlockHash, file_size: int) -> dict[str, str]:
        """Check everything but the checksum; leaves `f` at the payload. Returns the metadata."""
        header_len, header = _read_header(f, file_size)
        metadata = header.get("__metadata__")
        if not isinstance(metadata, dict):
            raise _Invalid("no metadata in header")
        version = metadata.get("format_version")
        if version != str(FORMAT_VERSION):
            raise _Invalid(f"format version {version!r}, this reader knows {FORMAT_VERSION}")
        self._check_fingerprint(metadata.get("fingerprint"))
        if metadata.get("key") != key.hex():
            raise _Invalid(f"holds key {metadata.get('key')!r}, expected {key.hex()}")
        if metadata.get("tp_rank") != str(self.tp_rank):
            raise _Invalid(f"written by tp_rank {metadata.get('tp_rank')!r}, not {self.tp_rank}")
        checksum = metadata.get("checksum")
        if not isinstance(checksum, str) or len(checksum) != 2 * _CHECKSUM_BYTES:
            raise _Invalid(f"bad checksum field {checksum!r}")
        tensor = header.get(TENSOR_NAME)
        expected = {
            "dtype": "U8",
            "shape": [self.block_bytes],
            "data_offsets": [0, self.block_bytes],
        }
        if tensor != expected or len(header) != 2:
            names = sorted(set(header) - {"__metadata__"})
            raise _Invalid(f"tensors {names} with {TENSOR_NAME}={tensor}, expected only {expected}")
        if file_size != 8 + header_len + self.block_bytes:
            raise _Invalid(
                f"file is {file_size} bytes, expected {8 + header_len + self.block_bytes}"
            )
        return metadata

    def _check_fingerprint(self, fingerprint_json: object) -> None:
        if not isinstance(fingerprint_json, str):
            raise _Invalid("no fingerprint in metadata")
        try:
            theirs = msgspec.json.decode(fingerprint_json, type=KVLayoutFingerprint)
        except msgspec.DecodeError as exc:
            raise _Invalid(f"undecodable fingerprint: {exc}") from None
        if theirs != self.fingerprint:
            differences = "; ".join(theirs.differences(self.fingerprint))
            raise _Invalid(f"fingerprint differs (file's != this store's): {differences}")

    def _check_buffer(self, tensor: torch.Tensor, what: str) -> None:
        if (
            tensor.dtype != torch.uint8
            or tensor.numel() != self.block_bytes
            or tensor.device.type != "cpu"
            or not tensor.is_contiguous()
        ):
            raise ValueError(
                f"{what} must be a contiguous uint8 CPU tensor of {self.block_bytes} elements, "
                f"got {tensor.dtype} shape {tuple(tensor.shape)} on {tensor.device}"
                f"{'' if tensor.is_contiguous() else ' (not contiguous)'}"
            )


def _read_header(f: BinaryIO, file_size: int) -> tuple[int, dict]:
    """The safetensors header: (its length in bytes, the parsed JSON)."""
    prefix = f.read(8)
    if len(prefix) != 8:
        raise _Invalid(f"file is {file_size} bytes, too short for a header")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > min(_MAX_HEADER_BYTES, file_size - 8):
        raise _Invalid(f"header length {header_len} does not fit a {file_size}-byte file")
    raw = f.read(header_len)
    try:
        header = json.loads(raw) if len(raw) == header_len else None
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, absurd nesting
        header = None
    if not isinstance(header, dict):
        raise _Invalid("header is not a JSON object")
    return header_len, header


def _read_exactly(f: BinaryIO, view: memoryview) -> None:
    # raw reads may return less than asked (signals, >2 GiB reads); loop until full
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise _Invalid(f"payload ends after {done} of {len(view)} bytes")
        done += n


def _checksum(block: torch.Tensor) -> str:
    data = memoryview(block.view(-1).numpy())
    return hashlib.blake2b(data, digest_size=_CHECKSUM_BYTES).hexdigest()


def _discard(path: Path, opened: os.stat_result) -> None:
    """Delete the corrupt file we opened, unless a writer has replaced it meanwhile (then
    the path holds a new, likely good file). The stat-then-unlink window is tiny; losing a
    good file in it costs one cache miss, never wrong bytes."""
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return
    if (current.st_ino, current.st_dev) == (opened.st_ino, opened.st_dev):
        path.unlink(missing_ok=True)
