"""Offload benchmark: TTFT of a long prompt re-hit from the host tier, from disk, and recomputed.

Part 1 (no vLLM): the store and load copies the offload worker runs on CPU (device cache ->
host pool and back, through vllm_llmd.ops) against a plain memcpy of the same bytes.

Part 2 (real vLLM CPU servers, bf16, one core each, a device cache that holds one prompt): for
each long prompt, its cold TTFT (recompute); then filler prompts evict it from the device
cache; then its re-hit TTFT, served from
- the host tier (LLMDConnector, `host_offload_bytes` large), or
- the disk tier (LLMDConnector, a host tier of a few blocks and a disk folder),
against a plain vLLM that must recompute it.

Usage: `.venv/bin/python benchmarks/bench_offload.py [--preset medium] [--prompt-tokens 2000]`.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

from vllm_llmd.devtools.client import timed_stream
from vllm_llmd.devtools.model_maker import PRESETS, cached_model, sample_text
from vllm_llmd.devtools.server import VLLMServer, VLLMServerConfig, llmd_connector
from vllm_llmd.offload.jobs import OffloadLoadSpec, OffloadStepSpec, StoreJob
from vllm_llmd.offload.worker import OffloadWorker
from vllm_llmd.ops import PagedKVCache

REPO_ROOT = Path(__file__).resolve().parents[1]
LOG_DIR = REPO_ROOT / "logs" / "bench_offload"
BLOCK = 128


def model_dir(preset: str) -> Path:
    return cached_model(preset, REPO_ROOT / ".cache" / "models")


def block_bytes(preset: str, dtype_bytes: int = 2) -> int:
    p = PRESETS[preset]
    return p.num_hidden_layers * p.num_key_value_heads * BLOCK * 2 * p.head_dim * dtype_bytes


# ---- part 1: the CPU copy path ---------------------------------------------------------------


def bench_copies(preset: str, prompt_tokens: int, repeats: int = 9) -> None:
    p = PRESETS[preset]
    num_blocks = -(-prompt_tokens // BLOCK)
    total_blocks = 4 * num_blocks
    layers = {
        f"layer{i}": torch.randn(total_blocks, p.num_key_value_heads, BLOCK, 2 * p.head_dim).to(
            torch.bfloat16
        )
        for i in range(p.num_hidden_layers)
    }
    cache = PagedKVCache.from_layers(layers)
    ids = torch.randperm(total_blocks)[:num_blocks].tolist()
    worker = OffloadWorker(cache, num_host_slots=2 * num_blocks, disk=None, num_disk_threads=1)
    # Slots as the manager hands them out: off a free list, so mostly one run.
    slots = list(range(num_blocks // 2, num_blocks // 2 + num_blocks))
    nbytes = num_blocks * cache.block_bytes

    stores = tuple(
        StoreJob(i.to_bytes(8, "big"), block, slot)
        for i, (block, slot) in enumerate(zip(ids, slots, strict=True))
    )

    def store() -> None:  # a step's device -> host stores, flushed as the next step does
        worker.submit_step(OffloadStepSpec(stores=stores))
        worker.flush_stores()

    def load() -> None:  # a request's host -> device load
        worker.load(OffloadLoadSpec("bench", tuple(ids), tuple(slots))).result()

    src = torch.empty(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)

    def memcpy() -> None:
        dst.copy_(src)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    base = best(memcpy)
    print(
        f"\n== CPU offload copies: {prompt_tokens}-token prompt of {preset} "
        f"({num_blocks} blocks, {nbytes / 2**20:.1f} MiB, bf16)"
    )
    print(f"  memcpy                {base * 1e3:7.2f} ms  {nbytes / base / 1e9:6.2f} GB/s")
    for name, fn in (("store device->host", store), ("load host->device", load)):
        t = best(fn)
        print(
            f"  {name:<21} {t * 1e3:7.2f} ms  {nbytes / t / 1e9:6.2f} GB/s  "
            f"({base / t:.2f}x memcpy bandwidth)"
        )


# ---- part 2: real servers --------------------------------------------------------------------


def run_system(server: VLLMServer, prompts, fillers) -> tuple[list[float], list[float]]:
    cold, rehit = [], []
    timed_stream(server.url, server.model_name, fillers[0][:64], max_tokens=2)  # warm-up
    for prompt in prompts:
        cold.append(timed_stream(server.url, server.model_name, prompt, max_tokens=2).ttft_s)
        for filler in fillers:  # push the prompt out of the device cache
            timed_stream(server.url, server.model_name, filler, max_tokens=1)
        rehit.append(timed_stream(server.url, server.model_name, prompt, max_tokens=2).ttft_s)
    return cold, rehit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--num-prompts", type=int, default=4)
    args = parser.parse_args()

    bench_copies(args.preset, args.prompt_tokens)

    model = model_dir(args.preset)
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))

    def tokens(seed: int) -> list[int]:
        return tokenizer.encode(sample_text(args.prompt_tokens, seed=seed)).ids[
            : args.prompt_tokens
        ]

    prompt_blocks = -(-args.prompt_tokens // BLOCK)
    chunk = block_bytes(args.preset)
    # The device cache holds about one prompt plus a filler: re-hits must come from a tier.
    device_bytes = (prompt_blocks + 4) * chunk
    max_len = (prompt_blocks + 3) * BLOCK
    disk = Path(tempfile.mkdtemp(prefix="llmd-bench-disk-"))
    systems = {
        "recompute (plain vLLM)": None,
        "LLMDConnector host tier": {"host_offload_bytes": 64 * prompt_blocks * chunk},
        "LLMDConnector disk tier": {
            "host_offload_bytes": (prompt_blocks + 2) * chunk,
            "disk_offload_path": str(disk),
        },
    }
    results = {}
    try:
        for k, (name, extra) in enumerate(systems.items()):
            config = VLLMServerConfig(
                model=model,
                dtype="bfloat16",
                cpu_cores="0",
                kv_cache_bytes=device_bytes,
                max_model_len=max_len,
                kv_transfer_config=None if extra is None else llmd_connector(extra=extra),
            )
            prompts = [tokens(2000 + 100 * k + i) for i in range(args.num_prompts)]
            fillers = [tokens(9000 + 100 * k + i) for i in range(2)]
            with VLLMServer(config, LOG_DIR / f"system{k}.log") as server:
                results[name] = run_system(server, prompts, fillers)
    finally:
        shutil.rmtree(disk, ignore_errors=True)

    cold = statistics.median(results["recompute (plain vLLM)"][1])
    print(
        f"\n== re-hit TTFT of a {args.prompt_tokens}-token prompt evicted from the device "
        f"cache ({args.preset}, bf16, one core, median of {args.num_prompts})"
    )
    print(f"  {'system':<26}{'cold TTFT s':>12}{'re-hit TTFT s':>15}{'vs recompute':>14}")
    for name, (first, again) in results.items():
        median = statistics.median(again)
        print(
            f"  {name:<26}{statistics.median(first):>12.3f}{median:>15.3f}{cold / median:>13.1f}x"
        )


if __name__ == "__main__":
    main()
