"""Shared-tier benchmark: TTFT of a long prompt on "host B" after "host A" computed it.

Setup (real processes, all on loopback): one Redis, two LMCache MP servers ("hosts" A and B)
sharing it as L2, and per connector a vLLM on each LMCache server (bf16, one core each):

- LLMDConnector with `shared_tier_url` (this package), and, with `--with-lmcache-mp`,
- vLLM's own LMCacheMPConnector on the same servers (the reference implementation),

plus a plain vLLM that recomputes. For each prompt, back to back: TTFT on the plain vLLM (cold),
on A (cold: computes and stores), then on B (loads the prompt's whole chunks from the shared
tier, computes the rest). Prints medians per connector. The box may be shared: compare rows of
one connector's block (measured in the same minutes), not across blocks.

Usage (needs the extra: pip install 'vllm-llmd[lmcache]', and redis-server on PATH):
    .venv-lmcache/bin/python benchmarks/bench_shared_tier.py [--preset small]
        [--prompt-tokens 2000] [--num-prompts 4] [--with-lmcache-mp]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from tokenizers import Tokenizer

from vllm_llmd.devtools.client import timed_stream
from vllm_llmd.devtools.model_maker import PRESETS, cached_model, sample_text
from vllm_llmd.devtools.server import VLLMServer, VLLMServerConfig, free_port
from vllm_llmd.shared.devserver import LMCacheServer, LMCacheServerConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
LOG_DIR = REPO_ROOT / "logs" / "bench_shared_tier"
ENV = {"LMCACHE_DISABLE_BANNER": "1", "LMCACHE_TRACK_USAGE": "false"}


def start_redis(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--appendonly", "no", "--dir", str(folder)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).returncode:
        if time.monotonic() > deadline:
            raise RuntimeError("redis-server did not start")
        time.sleep(0.1)
    return process, f"redis://127.0.0.1:{port}"


def connector(kind: str, lmcache: LMCacheServer) -> dict:
    if kind == "llmd":
        extra = {"shared_tier_url": lmcache.url}
        return {
            "kv_connector": "LLMDConnector",
            "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": extra,
        }
    extra = {
        "lmcache.mp.host": f"tcp://{lmcache.config.host}",
        "lmcache.mp.port": lmcache.config.port,
        "lmcache.mp.mq_timeout": 10,
        "lmcache.mp.heartbeat_interval": 2,
    }
    return {
        "kv_connector": "LMCacheMPConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": extra,
    }


def server(model: Path, cores: str, transfer: dict | None, name: str) -> VLLMServer:
    config = VLLMServerConfig(
        model=model, cpu_cores=cores, dtype="bfloat16", kv_transfer_config=transfer, env=ENV
    )
    return VLLMServer(config, LOG_DIR / f"{name}.log").start()


def ttft(target: VLLMServer, prompt: list[int]) -> float:
    return timed_stream(target.url, target.model_name, prompt, max_tokens=4).ttft_s * 1e3


def run_pair(
    plain: VLLMServer, a: VLLMServer, b: VLLMServer, prompts: list[list[int]]
) -> tuple[list, list, list]:
    """Per prompt, back to back (the same load on the box): plain cold, A cold, B loading."""
    recomputed, cold, loaded = [], [], []
    for prompt in prompts:
        recomputed.append(ttft(plain, prompt))
        cold.append(ttft(a, prompt))
        time.sleep(1.0)  # the LMCache server writes Redis after the store RPC returned
        loaded.append(ttft(b, prompt))
    return recomputed, cold, loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--with-lmcache-mp", action="store_true")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed")

    model = cached_model(args.preset, REPO_ROOT / ".cache" / "models")
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))

    def prompts(base: int) -> list[list[int]]:
        return [
            tokenizer.encode(sample_text(args.prompt_tokens, seed=base + i)).ids[
                : args.prompt_tokens
            ]
            for i in range(args.num_prompts)
        ]

    LOG_DIR.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="bench-shared-"))
    redis, redis_url = start_redis(folder)
    hosts = [
        LMCacheServer(
            LMCacheServerConfig(f"bench{name}", redis_url=redis_url, l1_size_gb=1),
            LOG_DIR / f"lmcache-{name}.log",
        ).start()
        for name in ("a", "b")
    ]
    results: dict[str, tuple[list, list, list]] = {}
    running: list[VLLMServer] = []
    try:
        for host in hosts:
            host.wait_ready()
        plain = server(model, "0", None, "plain")
        running.append(plain)
        plain.wait_ready()
        ttft(plain, prompts(5000)[0])  # warm-up
        kinds = ["llmd"] + (["lmcache-mp"] if args.with_lmcache_mp else [])
        for index, kind in enumerate(kinds):
            pair = [
                server(model, str(i), connector(kind, host), f"{kind}-{'ab'[i]}")
                for i, host in enumerate(hosts)
            ]
            running.extend(pair)
            for target in pair:
                target.wait_ready()
            ttft(pair[0], prompts(5000)[1])  # warm-up
            results[kind] = run_pair(plain, *pair, prompts(6000 + 100 * index))
            for target in pair:
                target.stop()
    finally:
        for target in running:
            target.stop()
        for host in hosts:
            host.cleanup()
        redis.terminate()
        redis.wait()
        shutil.rmtree(folder, ignore_errors=True)

    def row(label: str, values: list[float]) -> None:
        print(f"{label:34s}{statistics.median(values):16.0f}   {[round(x) for x in values]}")

    print(f"\n{args.preset}, {args.prompt_tokens}-token prompts, bf16, one core per server")
    print(f"{'':34s}{'median TTFT ms':>16s}   all")
    for kind, (recomputed, cold, loaded) in results.items():
        row(f"plain vLLM, cold (with {kind})", recomputed)
        row(f"{kind} A (cold, stores)", cold)
        row(f"{kind} B (shared-tier load)", loaded)


if __name__ == "__main__":
    main()
