"""Disk tier start-up: how long indexing a root of many block files takes.

Builds a root of N block files (default 100,000, a few KiB each: 2 layers of 1 KiB pages),
written with `DiskBlockStore.write` from a thread pool, plus a handful of hostile files (corrupt
or truncated headers, a foreign fingerprint, a file under another block's name, a zero-length
file, a huge header-length prefix, non-UTF-8 header bytes, a directory, a FIFO and a symlink
named like block files, an unreadable file when not running as root). Then times (median of
three; the hostile files are planted again before each run):

- `list_blocks()`: what a start does, by name and stat (no file opened);
- `list_blocks()` then `StartupHeaderCheck` to its end: the headers read in the background
  after the start (it deletes the hostile files);
- `scan()`: every header read and validated up front (what a start did before);

against the floor of any scan, a bare `os.scandir` walk of the same tree that stats each file,
and, for reference, a walk that also opens each file and reads its first 4 KiB. With `--cold`
the page cache is dropped before each run (as root): a node's first start, where every header
read is a random read of the disk.

Usage (from the repository root):

    .venv/bin/python benchmarks/bench_disk_index.py [--num-files 100000] [--root DIR] [--cold]

With `--root`, the block files are kept there and only missing ones are written, so a second
run skips the build (the build of 100k files takes a minute or two on a 2-core machine).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from vllm_llmd.kv_layout import KVLayoutFingerprint
from vllm_llmd.offload import disk_check, disk_scan
from vllm_llmd.offload.disk_check import StartupHeaderCheck
from vllm_llmd.offload.disk_store import DiskBlockStore

NUM_LAYERS, PAGE_BYTES = 2, 1024
TP_RANK = 0


def make_fingerprint(model: str = "bench-model") -> KVLayoutFingerprint:
    return KVLayoutFingerprint(
        model=model,
        dtype="bfloat16",
        num_layers=NUM_LAYERS,
        num_kv_heads=1,
        head_size=8,
        block_size=64,
        layout="LBHNC",
        tensor_parallel_size=2,
        page_bytes=PAGE_BYTES,
    )


def make_store(root: Path, model: str = "bench-model") -> DiskBlockStore:
    return DiskBlockStore(root, make_fingerprint(model), TP_RANK, NUM_LAYERS * PAGE_BYTES)


def block_key(i: int) -> bytes:
    return hashlib.sha256(f"bench block {i}".encode()).digest()


def build_root(store: DiskBlockStore, num_files: int, num_threads: int) -> int:
    """Write the block files that are missing; returns how many were written."""
    block = torch.randint(0, 256, (store.block_bytes,), dtype=torch.uint8)

    def write_missing(start: int) -> int:
        written = 0
        for i in range(start, min(start + 1000, num_files)):
            key = block_key(i)
            if not os.path.exists(store.path_for(key)):
                store.write(key, block, info=f"bench block {i}")
                written += 1
        return written

    with ThreadPoolExecutor(num_threads) as pool:
        return sum(pool.map(write_missing, range(0, num_files, 1000)))


def plant_hostile_files(store: DiskBlockStore) -> dict[str, Path]:
    """Files no scan may trip over, by what they are; (re)created on every call."""
    root = store.root
    block = torch.zeros(store.block_bytes, dtype=torch.uint8)

    def ours(name: str) -> Path:
        path = store.path_for(hashlib.sha256(f"hostile {name}".encode()).digest())
        path.parent.mkdir(exist_ok=True)
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        elif path.exists() or path.is_symlink():
            path.unlink()
        return path

    def valid(name: str) -> Path:
        path = ours(name)
        store.write(bytes.fromhex(path.name.split("-")[0]), block)
        return path

    planted: dict[str, Path] = {}
    path = planted["corrupt header"] = valid("corrupt header")
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage{[" * 4)
    path = planted["truncated payload"] = valid("truncated payload")
    os.truncate(path, path.stat().st_size - 100)
    path = planted["truncated header"] = valid("truncated header")
    os.truncate(path, 20)
    path = planted["foreign fingerprint"] = ours("foreign fingerprint")
    make_store(root, model="another-model").write(bytes.fromhex(path.name[:64]), block)
    path = planted["another block's file"] = ours("another block's file")
    shutil.copyfile(valid("original"), path)
    path = planted["zero-length file"] = ours("zero-length file")
    path.write_bytes(b"")
    path = planted["huge header length"] = ours("huge header length")
    path.write_bytes(b"\xff" * 8 + b"{}")
    path = planted["non-UTF-8 header"] = ours("non-UTF-8 header")
    path.write_bytes((64).to_bytes(8, "little") + b"\xff\xfe" * 32 + bytes(store.block_bytes))
    path = planted["directory"] = ours("directory")
    path.mkdir()
    path = planted["FIFO"] = ours("FIFO")
    os.mkfifo(path)
    path = planted["symlink"] = ours("symlink")
    path.symlink_to(valid("symlink target"))
    if os.geteuid() != 0:  # root reads any file
        path = planted["unreadable"] = valid("unreadable")
        path.chmod(0)
    return planted


def walk_and_stat(root: Path) -> int:
    """The floor of any scan: list every shard folder, stat every file."""
    count = 0
    for shard in os.scandir(root):
        if shard.is_dir():
            for entry in os.scandir(shard.path):
                entry.stat()
                count += 1
    return count


def walk_and_read(root: Path) -> int:
    """List every shard folder, open each regular file and read its first 4 KiB."""
    count = 0
    for shard in os.scandir(root):
        if shard.is_dir():
            for entry in os.scandir(shard.path):
                if entry.is_file(follow_symlinks=False):
                    fd = os.open(entry.path, os.O_RDONLY | os.O_NONBLOCK)
                    try:
                        os.fstat(fd)
                        os.pread(fd, 4096, 0)
                    finally:
                        os.close(fd)
                    count += 1
    return count


def drop_page_cache() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        raise SystemExit(f"--cold: cannot drop the page cache ({exc}); run as root") from None


def median_seconds(run: Callable[[], object], repeats: int, before: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        before()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-files", type=int, default=100_000)
    parser.add_argument("--root", type=Path, help="build (or reuse) the tree here and keep it")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write-threads", type=int, default=8)
    parser.add_argument("--no-hostile", action="store_true", help="only valid block files")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="drop the page cache before each timed run (needs root): a node's first start",
    )
    args = parser.parse_args()

    root = args.root or Path(tempfile.mkdtemp(prefix="bench_disk_index_"))
    try:
        store = make_store(root)
        start = time.perf_counter()
        written = build_root(store, args.num_files, args.write_threads)
        print(
            f"root {root}: {args.num_files} block files of "
            f"{store.path_for(block_key(0)).stat().st_size} bytes "
            f"({written} written in {time.perf_counter() - start:.1f} s)"
        )
        expected = args.num_files
        if not args.no_hostile:
            hostile = plant_hostile_files(store)
            expected += 2  # the valid files behind "symlink" and "another block's file"
        scanned = store.scan()
        print(f"scan found {len(scanned)} blocks (expected {expected})")
        if not args.no_hostile:
            gone = sorted(name for name, path in hostile.items() if not os.path.lexists(path))
            kept = sorted(set(hostile) - set(gone))
            print(f"  hostile files deleted: {', '.join(gone)}; left alone: {', '.join(kept)}")
        assert len(scanned) == expected, "scan lost or invented blocks"
        # the timed scans repeat that warning
        disk_scan.logger.setLevel(logging.ERROR)
        disk_check.logger.setLevel(logging.ERROR)

        def before_each() -> None:
            if not args.no_hostile:
                plant_hostile_files(store)
            if args.cold:
                drop_page_cache()

        def check_headers() -> None:
            check = StartupHeaderCheck([store], [block.key for block in store.list_blocks()])
            while not check.done:
                time.sleep(0.01)

        timed: dict[str, Callable[[], object]] = {
            "os.scandir + stat (floor)": lambda: walk_and_stat(root),
            "os.scandir + open + 4 KiB pread": lambda: walk_and_read(root),
            "DiskBlockStore.list_blocks() (start)": store.list_blocks,
            "list + StartupHeaderCheck (bg)": check_headers,
            "DiskBlockStore.scan()": store.scan,
        }
        results = [
            (name, median_seconds(run, args.repeats, before_each)) for name, run in timed.items()
        ]
        num_entries = walk_and_stat(root)
        floor = results[0][1]
        cache = "page cache dropped before each run" if args.cold else "page cache warm"
        print(
            f"\n{num_entries} entries, median of {args.repeats} runs, {os.cpu_count()} CPUs, "
            f"{cache}\n"
        )
        print(f"| {'method':<36} | {'seconds':>7} | {'files/s':>9} | vs floor |")
        print(f"|{'-' * 38}|{'-' * 9}|{'-' * 11}|{'-' * 10}|")
        for name, seconds in results:
            print(
                f"| {name:<36} | {seconds:7.3f} | {num_entries / seconds:9.0f} | "
                f"{seconds / floor:7.1f}x |"
            )
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
