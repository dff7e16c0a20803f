"""Shared-tier benchmark: LLMDConnector's shared LMCache tier against vLLM's LMCacheMPConnector.

Setup (real processes, all on loopback): one Redis, two LMCache MP servers ("hosts" A and B)
sharing it as L2, a plain vLLM that recomputes, and per connector a vLLM on each LMCache server
(bf16, A on core 0, B on core 1): LLMDConnector with `shared_tier_url` (plus a host tier on B),
and, with `--with-lmcache-mp`, vLLM's own LMCacheMPConnector on the same servers. All run at
once and the prompts are interleaved (prompt i: plain, ours A then B, theirs A then B), so both
connectors are measured under the same load; each connector gets its own prompts (the servers
are shared: theirs would otherwise find ours' chunks).

Part 1, two instances (the small model): TTFT of a long prompt on B when it loads it from the
shared tier (after A computed and stored it), and the prompt tokens B loaded (vLLM's
`external_kv_transfer` counter); on our B also a host-tier re-hit (a prompt B computed, pushed
out of its device cache, asked again).

Part 2, one instance (`--rehit`, the medium model, a 52 MiB device cache that holds about one
prompt): four prompts asked twice, on ours with a host tier and on theirs with its server's
memory; TTFT of the re-hits against the cold asks.

Usage (needs the extra: pip install 'vllm-llmd[lmcache]', and redis-server on PATH):
    .venv/bin/python benchmarks/bench_shared_tier.py [--preset small] [--prompt-tokens 2000]
        [--num-prompts 4] [--with-lmcache-mp] [--rehit]
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

from vllm_llmd.devtools.client import metric_sum, scrape_metrics, timed_stream
from vllm_llmd.devtools.model_maker import PRESETS, cached_model, sample_text
from vllm_llmd.devtools.server import VLLMServer, VLLMServerConfig, free_port
from vllm_llmd.shared_tier.lmcache_server import LMCacheServer, LMCacheServerConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
LOG_DIR = REPO_ROOT / "logs" / "bench_shared_tier"
ENV = {"LMCACHE_DISABLE_BANNER": "1", "LMCACHE_TRACK_USAGE": "false"}
SETTLE_S = 1.0


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


def server(
    model: Path,
    cores: str,
    transfer: dict | None,
    name: str,
    kv_cache_bytes: int | None = None,
    max_model_len: int = 4096,
) -> VLLMServer:
    config = VLLMServerConfig(
        model=model,
        cpu_cores=cores,
        dtype="bfloat16",
        kv_transfer_config=transfer,
        kv_cache_bytes=kv_cache_bytes,
        max_model_len=max_model_len,
        env=ENV,
    )
    return VLLMServer(config, LOG_DIR / f"{name}.log").start()


def ttft(target: VLLMServer, prompt: list[int]) -> float:
    return timed_stream(target.url, target.model_name, prompt, max_tokens=4).ttft_s * 1e3


def external_tokens(target: VLLMServer) -> float:
    samples = scrape_metrics(target.url)
    return metric_sum(samples, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer")


def loaded(target: VLLMServer, prompt: list[int]) -> tuple[float, float]:
    """(TTFT ms, prompt tokens loaded from outside the device cache) of one request."""
    before = external_tokens(target)
    elapsed = ttft(target, prompt)
    return elapsed, external_tokens(target) - before


def row(label: str, values: list[float], unit: str = "ms") -> None:
    shown = [round(x) for x in values]
    print(f"{label:44s}{statistics.median(values):10.0f} {unit:6s}  {shown}")


def two_instances(args: argparse.Namespace, model: Path, prompts, hosts) -> None:
    kinds = ["llmd"] + (["lmcache-mp"] if args.with_lmcache_mp else [])
    running: list[VLLMServer] = []
    try:
        plain = server(model, "0", None, "plain")
        running.append(plain)
        pairs = {}
        for kind in kinds:
            pair = []
            for i, host in enumerate(hosts):
                transfer = connector(kind, host)
                device_cache = None
                if kind == "llmd" and i == 1:  # B: a host tier too, for its own re-hit
                    transfer["kv_connector_extra_config"]["host_offload_bytes"] = 1 << 30
                    device_cache = 24 << 20  # about two prompts: later ones push out earlier
                name = f"{kind}-{'ab'[i]}"
                pair.append(server(model, str(i), transfer, name, device_cache))
            pairs[kind] = pair
            running.extend(pair)
        for target in running:
            target.wait_ready()
            ttft(target, prompts(5000)[0])  # warm-up (each server its own prompt)
        recomputed: list[float] = []
        cold: dict[str, list[float]] = {kind: [] for kind in kinds}
        shared: dict[str, list[tuple[float, float]]] = {kind: [] for kind in kinds}
        per_kind = {kind: prompts(6000 + 100 * index) for index, kind in enumerate(kinds)}
        for i in range(args.num_prompts):
            recomputed.append(ttft(plain, prompts(7000)[i]))
            # Servers on one core disturb each other for a moment after a request (the OpenMP
            # threads spin): let each settle, and alternate which connector goes first.
            for kind in kinds if i % 2 == 0 else kinds[::-1]:
                a, b = pairs[kind]
                prompt = per_kind[kind][i]
                time.sleep(SETTLE_S)
                cold[kind].append(ttft(a, prompt))
                time.sleep(SETTLE_S)  # the LMCache server writes Redis after the store RPC
                shared[kind].append(loaded(b, prompt))
        # Our B's own host tier: prompts B computed, pushed out of its 24 MiB device cache by
        # later ones, asked again.
        own = prompts(8000)
        llmd_b = pairs["llmd"][1]
        for prompt in own + prompts(8100):
            ttft(llmd_b, prompt)
        host_rehit = []
        for prompt in own:
            time.sleep(SETTLE_S)
            host_rehit.append(loaded(llmd_b, prompt))
    finally:
        for target in running:
            target.stop()

    print(f"\n{args.preset}, {args.prompt_tokens}-token prompts, bf16, one core per server")
    print(f"{'':44s}{'median':>10s}")
    row("plain vLLM (recompute)", recomputed)
    for kind in kinds:
        row(f"{kind} A (cold: computes, stores)", cold[kind])
        row(f"{kind} B (shared-tier load)", [t for t, _ in shared[kind]])
        row(f"{kind} B tokens loaded", [n for _, n in shared[kind]], "tokens")
    row("llmd B (own host tier re-hit)", [t for t, _ in host_rehit])
    row("llmd B host tier tokens loaded", [n for _, n in host_rehit], "tokens")


def rehit(args: argparse.Namespace, hosts) -> None:
    """One instance each: re-hits from our host tier vs from LMCache's server memory."""
    model = cached_model("medium", REPO_ROOT / ".cache" / "models")
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    prompts = [tokenizer.encode(sample_text(2000, seed=9000 + i)).ids[:2000] for i in range(4)]
    device_cache = 52 << 20
    ours = connector("llmd", hosts[0])
    ours["kv_connector_extra_config"] = {"host_offload_bytes": 1 << 30}
    results: dict[str, tuple[list[float], list[float]]] = {}
    for kind, transfer in (
        ("llmd host tier", ours),
        ("lmcache-mp", connector("lmcache-mp", hosts[1])),
    ):
        target = server(model, "0", transfer, f"rehit-{kind.split()[0]}", device_cache, 2048)
        try:
            target.wait_ready()
            ttft(target, tokenizer.encode(sample_text(300, seed=1)).ids)  # warm-up
            first, again = [], []
            for prompt in prompts:
                time.sleep(SETTLE_S)
                first.append(ttft(target, prompt))
            for prompt in prompts:
                time.sleep(SETTLE_S)
                again.append(loaded(target, prompt))
        finally:
            target.stop()
        results[kind] = (first, again)
    print("\nmedium, four 2000-token prompts asked twice, 52 MiB device cache, one core")
    for kind, (first, again) in results.items():
        row(f"{kind}: cold", first)
        row(f"{kind}: re-hit", [t for t, _ in again])
        row(f"{kind}: re-hit tokens loaded", [n for _, n in again], "tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--with-lmcache-mp", action="store_true")
    parser.add_argument("--rehit", action="store_true", help="also part 2 (one instance)")
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
    try:
        for host in hosts:
            host.wait_ready()
        two_instances(args, model, prompts, hosts)
        if args.rehit:
            rehit(args, hosts)
    finally:
        for host in hosts:
            host.cleanup()
        redis.terminate()
        redis.wait()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
