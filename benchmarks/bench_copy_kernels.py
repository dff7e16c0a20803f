"""GB/s of vllm_llmd.ops block copies, and a GPU correctness sweep of the kernels.

One prompt's blocks (default: 4k tokens of a 32-layer, 8-KV-head, head-dim-128 bf16 model,
LBHNC as Nixl/Offloading ask) are gathered into one contiguous buffer and scattered back:

    python benchmarks/bench_copy_kernels.py            # CUDA if present, else CPU
    python benchmarks/bench_copy_kernels.py --quick    # smaller prompt and model, < 1 min on CPU
    python benchmarks/bench_copy_kernels.py --check    # GPU: kernels vs torch path, every case

On CUDA, per block size and direction (device->device, device->pinned host, pinned
host->device): the kernels (one launch), one `copy_` per block per layer, and the best batched
torch path (index_select / index_copy_, plus one copy to or from pinned memory), each against
one large `copy_` of the same bytes (the link's practical limit). On CPU: the torch path
against one plain `copy_` of the same bytes, and against one `copy_` per block per layer.
Needs torch only (no vLLM).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from report_rows import Row, append_rows

from vllm_llmd.ops import PagedKVCache, gather_blocks, scatter_blocks
from vllm_llmd.ops.layouts import LAYOUTS, KVCacheShape, allocate_kv_caches


def timed(fn: Callable[[], None], device: torch.device, reps: int) -> float:
    """Median seconds of one fn call over reps runs, after one warm-up.

    On CUDA each run times 4 calls queued back to back between two events, so a call's host
    work (checks, launch) overlaps the previous call's copy, as it does in a busy worker.
    """
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(4):
                fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3 / 4)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def per_block_copies(cache_layers, ids, buffer, gather):
    """The naive baseline: one copy_ per block per layer."""
    pages = buffer.view(len(ids), len(cache_layers), -1)

    def run():
        for i, block in enumerate(ids):
            for layer, tensor in enumerate(cache_layers):
                page = tensor[block].view(-1).view(torch.uint8)
                if gather:
                    pages[i, layer].copy_(page, non_blocking=True)
                else:
                    page.copy_(pages[i, layer], non_blocking=True)

    return run


def bench_block_size(args, block_size: int, device: torch.device) -> list[Row]:
    num_ids = args.tokens // block_size
    shape = KVCacheShape(
        args.layers, num_ids + num_ids // 4, args.heads, block_size, 2 * args.head_dim
    )
    allocated = allocate_kv_caches("LBHNC", shape, torch.bfloat16, device=device)
    cache = PagedKVCache.from_layers(allocated.kv_caches)
    layers = list(allocated.kv_caches.values())
    ids = torch.randperm(shape.num_blocks)[:num_ids].tolist()
    nbytes = cache.buffer_bytes(num_ids)
    gib = nbytes / 1e9
    print(
        f"\nblock size {block_size}: {num_ids} blocks x {args.layers} layers, "
        f"page {cache.page_bytes / 1024:.0f} KiB, {nbytes / 2**20:.0f} MiB per copy"
    )

    if device.type == "cpu":
        # filled, so no timed run pays for first-touch page faults
        buffer = torch.zeros(nbytes, dtype=torch.uint8)
        plain_src = torch.ones(nbytes, dtype=torch.uint8)
        limit = gib / timed(partial(buffer.copy_, plain_src), device, args.reps)
        rows = {
            "gather, torch path": partial(gather_blocks, cache, ids, buffer, mode="torch"),
            "scatter, torch path": partial(scatter_blocks, cache, ids, buffer, mode="torch"),
            "gather, copy_ per block per layer": per_block_copies(layers, ids, buffer, True),
        }
        print(f"  {'plain copy_ of the same bytes':36s} {limit:7.2f} GB/s")
        results = []
        for name, fn in rows.items():
            rate = gib / timed(fn, device, args.reps)
            print(f"  {name:36s} {rate:7.2f} GB/s  {rate / limit:5.2f}x plain copy_")
            results.append(Row(f"{name}, block {block_size}", rate, "plain copy_", limit))
        return results

    directions = {
        "d2d": torch.empty(nbytes, dtype=torch.uint8, device=device),
        "d2h": torch.empty(nbytes, dtype=torch.uint8, pin_memory=True),
        "h2d": torch.empty(nbytes, dtype=torch.uint8, pin_memory=True),
    }
    contiguous = torch.empty(nbytes, dtype=torch.uint8, device=device)
    results = []
    for direction, buffer in directions.items():
        gather = direction != "h2d"
        copy = gather_blocks if gather else scatter_blocks
        # The link's practical limit: one large copy_ of the same bytes, same direction.
        source, target = (contiguous, buffer) if gather else (buffer, contiguous)
        limit = gib / timed(partial(target.copy_, source, non_blocking=True), device, args.reps)
        rows = {
            "kernels": partial(copy, cache, ids, buffer, mode="cuda"),
            "torch batched": partial(copy, cache, ids, buffer, mode="torch"),
            "copy_ per block per layer": per_block_copies(layers, ids, buffer, gather),
        }
        rates = {name: gib / timed(fn, device, args.reps) for name, fn in rows.items()}
        print(f"  {direction}: one large copy_ {limit:7.1f} GB/s")
        for name, rate in rates.items():
            print(
                f"    {name:28s} {rate:7.1f} GB/s  {rate / limit:5.2f}x link  "
                f"kernels {rates['kernels'] / rate:5.2f}x this"
            )
        # #17's goals: kernels >= 90% of the link with 16-token blocks, >= 2x per-block copies
        kernels = rates["kernels"]
        check = f"kernels {direction}, block {block_size}"
        link_goal = 0.9 if block_size == 16 else None
        results.append(Row(check, kernels, "one large copy_", limit, link_goal))
        results.append(Row(check, kernels, "torch batched", rates["torch batched"]))
        per_block = rates["copy_ per block per layer"]
        results.append(Row(check, kernels, "copy_ per block per layer", per_block, 2.0))
    return results


def new_buffer(nbytes: int, direction: str, device: torch.device) -> torch.Tensor:
    if direction == "d2d":
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def check_kernels(device: torch.device) -> None:
    """Kernels vs torch path for each layout, dtype, block size and direction (GPU only)."""
    failures = 0
    cases = 0
    for layout in LAYOUTS:
        for dtype in (torch.bfloat16, torch.float16, torch.uint8):  # uint8: fp8 stored as bytes
            for block_size in (16, 32, 128):
                shape = KVCacheShape(4, 48, 8, block_size, 256)
                allocated = allocate_kv_caches(layout, shape, dtype, device=device)
                cache = PagedKVCache.from_layers(allocated.kv_caches)
                ids = torch.randperm(shape.num_blocks)[:20].tolist()
                for direction in ("d2d", "d2h", "h2d"):
                    cases += 1
                    if not check_case(cache, ids, direction, device):
                        failures += 1
                        print(f"  MISMATCH {layout} {dtype} block {block_size} {direction}")
    print(f"check: {cases - failures}/{cases} cases match")
    if failures:
        raise SystemExit(1)


def check_case(cache: PagedKVCache, ids: list[int], direction: str, device: torch.device) -> bool:
    nbytes = cache.buffer_bytes(len(ids))
    by_kernel, by_torch = (new_buffer(nbytes, direction, device) for _ in range(2))
    if direction == "h2d":  # scatter random bytes with the kernels, read back with torch
        by_kernel.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8))
        scatter_blocks(cache, ids, by_kernel, mode="cuda")
        gather_blocks(cache, ids, by_torch, mode="torch")
    else:
        gather_blocks(cache, ids, by_kernel, mode="cuda")
        gather_blocks(cache, ids, by_torch, mode="torch")
    torch.cuda.synchronize(device)
    return torch.equal(by_kernel.cpu(), by_torch.cpu())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1k tokens, 8 layers, 3 reps")
    parser.add_argument("--check", action="store_true", help="GPU correctness sweep only")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[16, 32, 128])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--json", type=Path, help="append one JSON line per figure here")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.layers, args.reps = 1024, 8, 3
    name = (
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    device = torch.device(name)
    torch.manual_seed(0)
    if args.check:
        if device.type != "cuda":
            raise SystemExit("--check needs a CUDA GPU: the CPU tests cover the host build")
        check_kernels(device)
        return
    print(
        f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
        f"torch {torch.__version__}, {args.tokens} tokens, {args.layers} layers, "
        f"{args.heads} KV heads, head dim {args.head_dim}, bf16, LBHNC"
    )
    rows = []
    for block_size in args.block_sizes:
        rows += bench_block_size(args, block_size, device)
    append_rows(args.json, rows, device.type)


if __name__ == "__main__":
    main()
