"""The worker half's byte paths against the link they run on: P/D pulls and offload tiers.

One prompt's KV (default: 4k tokens of a 32-layer, 8-KV-head, head-dim-128 bf16 model, 16-token
blocks, LBHNC) moved by the real `LLMDConnectorWorker` (through
`vllm_llmd.devtools.worker_harness`, no vLLM needed), each against a copy of the same bytes
measured in the same run:

- **pull**: a decode worker pulls every block from a prefill worker in another process, by
  CUDA IPC (GPU), shared memory and the socket; against one device→device `copy_` of the same
  bytes (on the CPU: one plain `copy_`). Goal (#17): CUDA IPC ≥ 70% of it.
- **offload store / load**: every block into host slots (pinned on CUDA) and back into other
  blocks; against one large `copy_` of the same bytes device→pinned host and back (the link's
  practical limit). Goal: ≥ 80%.

    python benchmarks/bench_gpu_paths.py            # CUDA if present, else CPU
    python benchmarks/bench_gpu_paths.py --quick    # 1k tokens, 8 layers
    python benchmarks/bench_gpu_paths.py --json rows.jsonl   # also rows for gpu_report.py

Each figure is the median of --reps runs after a warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from report_rows import Row, append_rows

from vllm_llmd.devtools import worker_harness as harness
from vllm_llmd.devtools.worker_harness import (
    CacheCase,
    LLMDConnectorMetadata,
    LLMDConnectorWorker,
    OffloadLoadSpec,
    PrefillProcess,
)
from vllm_llmd.offload.jobs import OffloadStepSpec, StoreJob


def median_s(run: Callable[[], None], reps: int, sync: Callable[[], None]) -> float:
    run()  # warm-up: kernels compiled, mappings opened, pages touched
    sync()
    times = []
    for _ in range(reps):
        begin = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def synchronizer(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def copy_rate(nbytes: int, device: str, direction: str, reps: int) -> float:
    """GB/s of one large copy_ of nbytes: "d2d" on the device, "d2h" from it into host memory,
    "h2d" back (host memory pinned on CUDA: the link's practical limit)."""
    pinned = device == "cuda"
    on_device = torch.ones(nbytes, dtype=torch.uint8, device=device)
    if direction == "d2d":
        other = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    else:
        other = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=pinned)
    source, target = (other, on_device) if direction == "h2d" else (on_device, other)
    seconds = median_s(lambda: target.copy_(source, non_blocking=True), reps, synchronizer(device))
    return nbytes / seconds / 1e9


def pull_seconds(
    prefill: PrefillProcess, decode: LLMDConnectorWorker, path: str, num: int, reps: int
) -> float:
    """Median seconds of one pull of num blocks (held, pulled, released: only the pull
    timed), after a warm-up that opens the mappings."""
    remote = list(range(num))
    local = list(range(decode.kv_cache.num_blocks - num, decode.kv_cache.num_blocks))
    took = []
    for _ in range(reps + 1):
        transfer_id = harness.new_transfer_id()
        prefill.hold(0, transfer_id, transfer_id, remote)
        recv = prefill.recv_spec(0, transfer_id, transfer_id, remote, local)
        start = time.perf_counter()
        with harness.another_host() if path == "socket" else contextlib.nullcontext():
            decode.start_load_kv(LLMDConnectorMetadata(recvs=[recv]))
            assert harness.wait_loaded(decode, transfer_id) is False
        took.append(time.perf_counter() - start)
        assert prefill.released(0, transfer_id)["held"] == 0
    return statistics.median(took[1:])


def bench_pulls(case: CacheCase, device: str, reps: int) -> list[Row]:
    num = case.num_blocks * 4 // 5
    nbytes = num * case.block_bytes
    baseline = copy_rate(nbytes, device, "d2d", reps)
    paths = (["cuda_ipc"] if device == "cuda" else []) + ["shm", "socket"]
    rows = []
    with PrefillProcess(device, [case]) as prefill:
        for path in paths:
            decode, _ = harness.make_worker(case, device, 100, cuda_ipc=path == "cuda_ipc")
            try:
                seconds = pull_seconds(prefill, decode, path, num, reps)
            finally:
                decode.shutdown()
            goal = 0.7 if path == "cuda_ipc" else None  # #17's goals are for a GPU
            check = f"pull by {path}, {nbytes / 2**20:.0f} MiB"
            rows.append(Row(check, nbytes / seconds / 1e9, "device copy_", baseline, goal))
    return rows


def bench_offload(case: CacheCase, device: str, reps: int) -> list[Row]:
    num = case.num_blocks // 2
    nbytes = num * case.block_bytes
    worker, _ = harness.make_worker(case, device, 7, host_offload_bytes=nbytes)
    offload = worker.offload
    assert offload is not None
    sources, targets = list(range(num)), list(range(num, 2 * num))
    stores = tuple(StoreJob(bytes([i % 256, i // 256]) * 16, b, i) for i, b in enumerate(sources))
    load = OffloadLoadSpec("bench", block_ids=tuple(targets), slots=tuple(range(num)))
    sync = synchronizer(device)

    def store() -> None:  # wait_for_save hands the step over; flush waits for its copies
        worker.wait_for_save(LLMDConnectorMetadata(offload_step=OffloadStepSpec(stores=stores)))
        offload.flush_stores()

    try:
        store_s = median_s(store, reps, sync)
        load_s = median_s(lambda: offload.load(load).result(), reps, sync)
    finally:
        worker.shutdown()
    link_out = copy_rate(nbytes, device, "d2h", reps)
    link_in = copy_rate(nbytes, device, "h2d", reps)
    link = "pinned copy_" if device == "cuda" else "plain copy_"
    size, goal = f"{nbytes / 2**20:.0f} MiB", 0.8 if device == "cuda" else None
    return [
        Row(f"offload store, {size}", nbytes / store_s / 1e9, link, link_out, goal),
        Row(f"offload load, {size}", nbytes / load_s / 1e9, link, link_in, goal),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1k tokens, 8 layers, 3 reps")
    parser.add_argument("--json", type=Path, help="append one JSON line per figure here")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.layers, args.reps = 1024, 8, 3
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    blocks = args.tokens // args.block_size
    # pulls move 4/5 of the cache (one prompt), offload half of it each way
    case = CacheCase("flashinfer", "bf16", args.block_size, args.layers, blocks * 5 // 4)
    print(
        f"{device} ({torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}), torch "
        f"{torch.__version__}: {args.tokens}-token prompt, {args.layers} layers, 8 KV heads, "
        f"head dim 128, bf16, {args.block_size}-token blocks ({case.block_bytes / 2**20:.2f} "
        "MiB per block)"
    )
    rows = bench_pulls(case, device, args.reps)
    rows += bench_offload(replace(case, num_blocks=2 * blocks), device, args.reps)
    for row in rows:
        print("  " + row.line())
    append_rows(args.json, rows, device)


if __name__ == "__main__":
    main()
