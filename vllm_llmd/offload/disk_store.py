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
    checksum         BLAKE3 of the payload, 16-byte digest, hex
    info             the caller's description of the block (opaque text; e.g. the tokens and
                     parent hash a KV event needs), returned by `scan` and `check_header`

Validation. `list_blocks` (a start; the walk itself is in `disk_scan`) reads names and sizes only.
`check_header` and `scan` read headers: format version, fingerprint, key (it must match the file's
name and shard), tp_rank, checksum field, info field, tensor dtype/shape/offsets and the file's
size. `read` checks all of that again and the payload's checksum, so bytes corrupted after a check
are caught. A file that fails is deleted and never returned. Files of other tp_ranks belong to the
other workers sharing the folder: they are neither opened nor deleted. Files whose names are not
ours, and entries that are not regular files (directories, symlinks, FIFOs), are left alone. No file
or folder makes `scan` raise. A root holds one model's blocks: a file with another fingerprint is
deleted, so give each model (fingerprint) its own root.

Concurrency. A write goes to a uniquely named temp file in the target's folder, then
`os.replace` renames it over the target: readers see the old file, no file, or the new file,
never a partial one. A reader reads header and payload from one open file descriptor, so a
concurrent replace or delete does not mix two files. Writes are not fsync'ed: the cache is
best-effort, and a file torn by a power loss fails the size or checksum check. The header is
padded with spaces to a page, so a file is one O_DIRECT write where the filesystem allows
(`direct_io`: a buffered write cost ~10 ms of kernel CPU per 3 MiB block here).
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from stat import S_ISREG
from typing import Any, BinaryIO

import msgspec
import torch
from blake3 import blake3

from vllm_llmd.hashing import BlockHash
from vllm_llmd.kv_layout import KVLayoutFingerprint
from vllm_llmd.offload.direct_io import ALIGN, BlockFileWriter
from vllm_llmd.offload.disk_scan import (
    NOT_A_FILE_ERRNOS,
    OPEN_FLAGS,
    SUFFIX,
    InvalidBlockFile,
    ScannedBlockFile,
    read_header,
    scan_root,
)

__all__ = [
    "FORMAT_VERSION",
    "CorruptBlockFileError",
    "DiskBlockStore",
    "MissingBlockFileError",
    "ScannedBlockFile",
]

# Version history:
#   1: first version (one U8 tensor "kv"; fingerprint, key, tp_rank, blake2b-128 checksum).
#   2: the checksum is BLAKE3-128 (SIMD, ~7x blake2b here: it ran on every block written, on
#      the engine's cores); version-1 files are refused at the scan like any foreign file.
FORMAT_VERSION = 2
_FORMAT_VERSION_TEXT = str(FORMAT_VERSION)
TENSOR_NAME = "kv"
_CHECKSUM_BYTES = 16


class CorruptBlockFileError(RuntimeError):
    """A block cannot be read: its file failed validation (and has been deleted) or is
    missing (`MissingBlockFileError`). Either way the caller treats the block as a miss."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"block file {path}: {reason}")
        self.path = path
        self.reason = reason


class MissingBlockFileError(CorruptBlockFileError):
    """The block file does not exist (deleted by someone else, or never written)."""


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
        # what files record and are checked against: without the fields of later versions
        # that only P/D reads, so the files of earlier versions still match
        fingerprint = fingerprint.for_storage()
        self.fingerprint = fingerprint
        self.tp_rank = tp_rank
        self.block_bytes = block_bytes
        self._fingerprint_json = msgspec.json.encode(fingerprint).decode()
        self._tp_rank_text = str(tp_rank)
        self._tensor_entry = {
            "dtype": "U8",
            "shape": [block_bytes],
            "data_offsets": [0, block_bytes],
        }
        self.root.mkdir(parents=True, exist_ok=True)
        self._writer = BlockFileWriter()

    def path_for(self, key: BlockHash) -> Path:
        if not key:
            raise ValueError("block key must be non-empty bytes")
        key_hex = key.hex()
        return self.root / key_hex[:2] / f"{key_hex}-r{self.tp_rank}{SUFFIX}"

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
        header = _padded_header({"__metadata__": metadata, TENSOR_NAME: self._tensor_entry})
        path.parent.mkdir(exist_ok=True)
        temp = path.parent / f".{path.name[: -len(SUFFIX)]}.{uuid.uuid4().hex}.tmp"
        try:
            self._writer.write(temp, header, block)
            size = len(header) + self.block_bytes
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
        f, stat = _open_block_file(path)
        with f, _deleted_if_invalid(path, stat):
            header_len, header = read_header(f.fileno(), stat.st_size)
            metadata = self._validate_header(header, header_len, key.hex(), stat.st_size)
            f.seek(8 + header_len)
            _read_exactly(f, memoryview(out.view(-1).numpy()))
            if _checksum(out) != metadata["checksum"]:
                raise InvalidBlockFile("payload checksum mismatch")
        return out

    def check_header(self, key: BlockHash) -> str:
        """Validate the header of `key`'s file as `scan` does (all but the payload's checksum)
        and return its `info` text. One bounded read, whatever the block's size.

        Raises:
            MissingBlockFileError: there is no file for `key`.
            CorruptBlockFileError: the file failed validation; it has been deleted.
        """
        path = self.path_for(key)
        f, stat = _open_block_file(path)
        with f, _deleted_if_invalid(path, stat):
            header_len, header = read_header(f.fileno(), stat.st_size)
            metadata = self._validate_header(header, header_len, key.hex(), stat.st_size)
        return str(metadata.get("info", ""))

    def delete(self, key: BlockHash) -> None:
        self.path_for(key).unlink(missing_ok=True)

    def list_blocks(self) -> list[ScannedBlockFile]:
        """Index this rank's block files at start-up, oldest write first, without opening any
        (no `info`): a stat per file. Their headers are for `check_header`, off the start;
        deletes stale temp files and misplaced names as `scan` does. Never raises for what it
        finds on disk."""
        return scan_root(self.root, self.tp_rank, None)

    def scan(self) -> list[ScannedBlockFile]:
        """Rebuild the index at start-up: this rank's valid blocks, oldest write first.

        Reads headers only (the checksum is checked by `read`). Deletes this rank's invalid
        files and stale temp files; logs what it deleted and why. Never raises for what it
        finds on disk (see `disk_scan`).
        """
        return scan_root(self.root, self.tp_rank, self._validate_header)

    def _validate_header(
        self, header: dict[str, Any], header_len: int, key_hex: str, file_size: int
    ) -> dict[str, Any]:
        """Check a parsed header (and the file's size) against this store and the key the
        file's name gives; everything but the checksum. Returns the header's metadata."""
        metadata = header.get("__metadata__")
        if not isinstance(metadata, dict):
            raise InvalidBlockFile("no metadata in header")
        version = metadata.get("format_version")
        if version != _FORMAT_VERSION_TEXT:
            raise InvalidBlockFile(
                f"format version {version!r}, this reader knows {FORMAT_VERSION}"
            )
        fingerprint_json = metadata.get("fingerprint")
        if fingerprint_json != self._fingerprint_json:  # else it is ours, byte for byte
            self._check_fingerprint(fingerprint_json)
        if metadata.get("key") != key_hex:
            raise InvalidBlockFile(f"holds key {metadata.get('key')!r}, expected {key_hex}")
        if metadata.get("tp_rank") != self._tp_rank_text:
            raise InvalidBlockFile(
                f"written by tp_rank {metadata.get('tp_rank')!r}, not {self.tp_rank}"
            )
        checksum = metadata.get("checksum")
        if not isinstance(checksum, str) or len(checksum) != 2 * _CHECKSUM_BYTES:
            raise InvalidBlockFile(f"bad checksum field {checksum!r}")
        if not isinstance(metadata.get("info", ""), str):
            raise InvalidBlockFile(f"info field {metadata['info']!r} is not text")
        tensor = header.get(TENSOR_NAME)
        if tensor != self._tensor_entry or len(header) != 2:
            names = sorted(set(header) - {"__metadata__"})
            raise InvalidBlockFile(
                f"tensors {names} with {TENSOR_NAME}={tensor}, expected only {self._tensor_entry}"
            )
        if file_size != 8 + header_len + self.block_bytes:
            raise InvalidBlockFile(
                f"file is {file_size} bytes, expected {8 + header_len + self.block_bytes}"
            )
        return metadata

    def _check_fingerprint(self, fingerprint_json: object) -> None:
        if not isinstance(fingerprint_json, str):
            raise InvalidBlockFile("no fingerprint in metadata")
        try:
            theirs = msgspec.json.decode(fingerprint_json, type=KVLayoutFingerprint)
        except msgspec.DecodeError as exc:
            raise InvalidBlockFile(f"undecodable fingerprint: {exc}") from None
        if theirs != self.fingerprint:
            differences = "; ".join(theirs.differences(self.fingerprint))
            raise InvalidBlockFile(f"fingerprint differs (file's != this store's): {differences}")

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


def _open_block_file(path: Path) -> tuple[BinaryIO, os.stat_result]:
    """`path` opened for reading, and its stat: never a symlink, FIFO or device put where a
    block file should be (left alone, as `scan` leaves it), and never a wait on a FIFO."""
    try:
        fd = os.open(path, OPEN_FLAGS)
    except FileNotFoundError:
        raise MissingBlockFileError(path, "no such file") from None
    except OSError as exc:
        if exc.errno in NOT_A_FILE_ERRNOS:
            raise CorruptBlockFileError(path, f"not a regular file ({exc.strerror})") from None
        raise CorruptBlockFileError(path, f"cannot open: {exc}") from None
    f = open(fd, "rb", buffering=0)
    try:
        stat = os.fstat(fd)
    except OSError as exc:
        f.close()
        raise CorruptBlockFileError(path, f"cannot stat: {exc}") from None
    if not S_ISREG(stat.st_mode):
        f.close()
        raise CorruptBlockFileError(path, "not a regular file")
    return f, stat


@contextmanager
def _deleted_if_invalid(path: Path, opened: os.stat_result) -> Iterator[None]:
    """Turn a failed check or read of the open file into CorruptBlockFileError, deleting it."""
    try:
        yield
    except (InvalidBlockFile, OSError) as exc:
        _discard(path, opened)
        raise CorruptBlockFileError(path, f"{exc}; deleted") from None


def _read_exactly(f: BinaryIO, view: memoryview) -> None:
    # raw reads may return less than asked (signals, >2 GiB reads); loop until full
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise InvalidBlockFile(f"payload ends after {done} of {len(view)} bytes")
        done += n


def _padded_header(header: dict[str, Any]) -> bytes:
    """The safetensors header (u64 length, then JSON) padded with spaces, as the format allows,
    to a multiple of `ALIGN`: the payload then starts aligned and the file is one O_DIRECT
    write."""
    text = msgspec.json.encode(header)
    padded = -(-(8 + len(text)) // ALIGN) * ALIGN - 8
    return struct.pack("<Q", padded) + text.ljust(padded, b" ")


def _checksum(block: torch.Tensor) -> str:
    data = memoryview(block.view(-1).numpy())
    return blake3(data, max_threads=1).hexdigest(length=_CHECKSUM_BYTES)


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
