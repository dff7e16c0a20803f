"""What mutual TLS costs a side-channel pull, by where the two ends run (issue #22).

bench_pd.py's part 1 pulls within one process; here the prefill side (a TransferServer) runs
in a process of its own, as in a deployment, and the decode side pulls from this process.
Each pull moves one long prompt's KV (--mib) through the socket, plain and with TLS 1.3
(AES-GCM, mutual certificates from a throwaway CA), interleaved pull by pull. Placements:

- `apart`: prefill on core 0, decode on core 1 (pods with cores of their own): the prefill
  encrypts one record while the decode decrypts the one before, so the cipher mostly overlaps;
- `shared`: both on core 0 (one core for both ends): every byte is encrypted, then decrypted,
  on that core, one after the other.

`--busy-thread WORK_MS,PAUSE_MS` runs a second thread that holds the GIL with Python for
WORK_MS, then sleeps PAUSE_MS, over and over, in the decode process (`--busy-in decode`: a vLLM
worker's main thread stepping while its request waits for the KV), the prefill process
(`prefill`: a prefill worker busy with other requests) or both. Every time the thread that
moves the bytes gives the GIL up (a socket call, a cipher call) it may have to wait for that
thread to hand it back.

It prints each placement's median pull, plain and TLS, and their ratio. Needs two cores.
Usage: `.venv/bin/python benchmarks/bench_tls_placement.py [--mib 10] [--pulls 40]
[--busy-thread 0.3,1 [--busy-in decode|prefill|both]]`.
"""

from __future__ import annotations

import argparse
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from vllm_llmd.devtools.certs import issue_certificate
from vllm_llmd.kv_layout import KVLayoutFingerprint
from vllm_llmd.transfer.client import PullSpec, pull_blocks
from vllm_llmd.transfer.registry import SendRegistry
from vllm_llmd.transfer.server import TransferServer
from vllm_llmd.transfer.tls import make_client_context, make_server_context

NUM_LAYERS = 32  # a 32-layer model's pages: one page per layer and block
PAGE_BYTES = 16 * 8 * 128 * 2 * 2  # 16 tokens x 8 KV heads x 128 dims x K and V x bf16
PLACEMENTS = {"apart": (0, 1), "shared": (0, 0)}  # (prefill core, decode core)


def fingerprint() -> KVLayoutFingerprint:
    return KVLayoutFingerprint(
        model="bench",
        dtype="bfloat16",
        num_layers=NUM_LAYERS,
        num_kv_heads=8,
        head_size=128,
        block_size=16,
        layout="LBHNC",
        tensor_parallel_size=1,
        page_bytes=PAGE_BYTES,
    )


def transfer_id(index: int) -> str:
    return f"{index:032d}"


def tls_files(folder: Path, name: str) -> tuple[str, str, str]:
    return str(folder / f"{name}.crt"), str(folder / f"{name}.key"), str(folder / "ca.crt")


def serve(
    pki: Path | None, num_blocks: int, num_pulls: int, core: int, busy_ms: tuple | None
) -> None:
    """The prefill side: a TransferServer holding num_pulls transfers of num_blocks blocks;
    prints its port, then serves until killed."""
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    cache = torch.randint(0, 256, (num_blocks, NUM_LAYERS, PAGE_BYTES), dtype=torch.uint8)

    def gather(ids: list[int], out: torch.Tensor | None) -> torch.Tensor:
        index = torch.tensor(ids)
        if out is None:
            return cache[index].reshape(-1)
        torch.index_select(cache, 0, index, out=out.view(len(ids), NUM_LAYERS, PAGE_BYTES))
        return out

    registry = SendRegistry(lease_s=3600)
    tls = make_server_context(*tls_files(pki, "prefill")) if pki is not None else None
    server = TransferServer(
        "127.0.0.1",
        0,
        registry,
        gather,
        fingerprint(),
        NUM_LAYERS * PAGE_BYTES,
        same_host_shm=False,  # every byte through the socket, as between hosts
        tls=tls,
    )
    for index in range(num_pulls):
        registry.add(f"request-{index}", transfer_id(index), list(range(num_blocks)))
    print(server.port, flush=True)
    if busy_ms is not None:
        busy(busy_ms[0] / 1e3, busy_ms[1] / 1e3, threading.Event())
    time.sleep(24 * 3600)


def start_server(
    pki: Path | None, num_blocks: int, num_pulls: int, core: int, busy_ms: tuple | None
) -> subprocess.Popen[str]:
    """The prefill process (serve); its first stdout line is its port."""
    command = [sys.executable, __file__, "--serve", str(core), "--blocks", str(num_blocks)]
    command += ["--pulls", str(num_pulls)] + (["--pki", str(pki)] if pki is not None else [])
    if busy_ms is not None:
        command += ["--busy-thread", ",".join(map(str, busy_ms))]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def busy(work_s: float, pause_s: float, stop: threading.Event) -> None:
    """Python for work_s (the GIL held), then a sleep of pause_s, until stop."""
    while not stop.is_set():
        until = time.perf_counter() + work_s
        while time.perf_counter() < until:
            pass
        time.sleep(pause_s)


def measure(
    pki: Path,
    num_blocks: int,
    num_pulls: int,
    cores: tuple[int, int],
    busy_ms: tuple | None,
    busy_in: str,
) -> dict:
    """Median pull (s) of each variant, plain and TLS interleaved pull by pull."""
    prefill_core, decode_core = cores
    os.sched_setaffinity(0, {decode_core})
    stop = threading.Event()
    prefill_busy = busy_ms if busy_in in ("prefill", "both") else None
    if busy_ms is not None and busy_in in ("decode", "both"):
        work_ms, pause_ms = busy_ms
        threading.Thread(
            target=busy, args=(work_ms / 1e3, pause_ms / 1e3, stop), daemon=True
        ).start()
    block_bytes = NUM_LAYERS * PAGE_BYTES
    dest = torch.empty(num_blocks * block_bytes, dtype=torch.uint8)

    def scatter(first: int, data: torch.Tensor) -> None:
        dest[first * block_bytes : first * block_bytes + data.numel()].copy_(data)

    client_tls = make_client_context(*tls_files(pki, "decode"))
    processes: list[subprocess.Popen[str]] = []
    times: dict[str, list[float]] = {"plain": [], "tls": []}
    try:
        # name -> (port, client context); each process is killed below whatever happens
        servers: dict[str, tuple[int, ssl.SSLContext | None]] = {}
        for name, server_pki, tls in (("plain", None, None), ("tls", pki, client_tls)):
            processes.append(
                start_server(server_pki, num_blocks, num_pulls, prefill_core, prefill_busy)
            )
            assert processes[-1].stdout is not None
            servers[name] = (int(processes[-1].stdout.readline()), tls)
        for index in range(num_pulls):
            for name, (port, tls) in servers.items():
                spec = PullSpec(
                    f"tcp://127.0.0.1:{port}",
                    transfer_id(index),
                    fingerprint(),
                    tuple(range(num_blocks)),
                    block_bytes,
                )
                start = time.perf_counter()
                pull_blocks(
                    spec,
                    scatter,
                    timeout_s=30,
                    unknown_transfer_grace_s=0,
                    max_chunk_bytes=64 << 20,
                    same_host_shm=False,
                    tls=tls,
                )
                times[name].append(time.perf_counter() - start)
    finally:
        stop.set()
        for process in processes:
            process.kill()
            process.wait()
    # the first pulls open the connections (the TLS handshake): left out
    return {name: statistics.median(pulls[2:]) for name, pulls in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=10.0, help="KV bytes per pull, in MiB")
    parser.add_argument("--pulls", type=int, default=40)
    parser.add_argument("--placements", default="apart,shared")
    parser.add_argument(
        "--busy-thread",
        metavar="WORK_MS,PAUSE_MS",
        help="a thread holding the GIL WORK_MS, then sleeping PAUSE_MS (see --busy-in)",
    )
    parser.add_argument("--busy-in", choices=("decode", "prefill", "both"), default="decode")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the prefill process
    parser.add_argument("--blocks", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pki", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    busy_ms = tuple(map(float, args.busy_thread.split(","))) if args.busy_thread else None
    if args.serve is not None:
        serve(args.pki, args.blocks, args.pulls, args.serve, busy_ms)
        return
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("needs two cores")
    num_blocks = max(1, round(args.mib * 2**20 / (NUM_LAYERS * PAGE_BYTES)))
    megabytes = num_blocks * NUM_LAYERS * PAGE_BYTES / 2**20
    print(f"socket pulls of {megabytes:.1f} MiB ({num_blocks} blocks of {NUM_LAYERS} layers)")
    with tempfile.TemporaryDirectory() as folder:
        pki = Path(folder)
        ca = issue_certificate(pki, "ca", None)
        issue_certificate(pki, "prefill", ca)
        issue_certificate(pki, "decode", ca)
        for placement in args.placements.split(","):
            cores = PLACEMENTS[placement]
            medians = measure(pki, num_blocks, args.pulls, cores, busy_ms, args.busy_in)
            plain, tls = medians["plain"], medians["tls"]
            print(
                f"  {placement:6} (prefill core {cores[0]}, decode core {cores[1]}): "
                f"plain {plain * 1e3:6.2f} ms, TLS {tls * 1e3:6.2f} ms, "
                f"{tls / plain:.2f}x (+{(tls - plain) * 1e3:.2f} ms), median of {args.pulls - 2}"
            )


if __name__ == "__main__":
    main()
