"""SLO benchmark: goodput of routing policies under an open-loop shared-prefix workload, in one run.

Two real vLLM CPU pods (one core each, LLMDConnector with a host tier, KV events on) serve the
same workload through, in turn:
- vllm-llmd-router `round_robin` (the baseline), `kv_aware` (our default) and `slo`;
- vllm-router (the Rust router of the vLLM project) `cache_aware` and `kv_aware` (fed by the
  pods' KV events), when its binary is found (`--vllm-router PATH`, or on PATH).

Workload: Poisson arrivals at each rate in `--rates`, for `--duration` seconds per (rate,
router). 80% of the requests start with one of a few long shared prefixes (a "system prompt"
of `--prefix-tokens`) plus a short unique suffix, 20% are short unique prompts; every request
streams `--output-tokens` tokens and carries TTFT and TPOT SLOs in llm-d's headers. Every
(rate, router) run gets prefixes of its own, so each starts with cold caches; before it, each
router serves `--warmup` seconds of the same load on other prefixes, unmeasured (the slo
policy's latency models learn there, as they would in a long-running router).

The TTFT SLO is set from a calibration on an idle pod: 60% of a cold long-prompt TTFT, so a cold
prefill of a shared prefix misses it and a cached one meets it; the TPOT SLO is 3x the idle
TPOT (or `--slo-ttft-ms` / `--slo-tpot-ms`). Goodput = requests per second that met both SLOs
(a refused request counts as missed). By default requests carry the SLO headers and no
objective, the router's default class for them (refused with 429 when their SLO passes in the
queue); `--objective standard=-1` makes them name a sheddable objective instead.

The rates should reach at least 3x the saturation rate: it prints the goodput table, each
router's peak against round robin's and how much of its peak it holds at the highest rate, and
writes a PNG of goodput and p90 TTFT against offered rate (`logs/bench_slo/`).

Usage: `.venv/bin/python benchmarks/bench_slo.py [--rates 1,2,4,8,12] [--duration 30]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from tokenizers import Tokenizer

from vllm_llmd.devtools.client import scrape_metrics, timed_stream
from vllm_llmd.devtools.model_maker import cached_model, sample_text
from vllm_llmd.devtools.server import VLLMServer, VLLMServerConfig, free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
LOG_DIR = REPO_ROOT / "logs" / "bench_slo"
# the workload client's percentile (a standalone script: imported from its folder)
sys.path.insert(0, str(REPO_ROOT / "examples" / "workload"))
from shared_prefix_chat import percentile  # noqa: E402

BLOCK = 128


@dataclass
class Outcome:
    ok: bool
    shed: bool
    ttft_s: float | None
    tpot_s: float | None
    # the pod that served it (the router's X-Routed-To) and the prompt tokens vLLM served from
    # its cache or a connector (usage.prompt_tokens_details, --enable-prompt-tokens-details)
    pod: str | None = None
    cached_tokens: int | None = None


# ---- processes ------------------------------------------------------------------------------


# each pod's host tier (LLMDConnector host_offload_bytes)
HOST_OFFLOAD_BYTES = 256 << 20


# each pod's API server and engine core on its core too (VLLMServerConfig.whole_server_on_cores)
WHOLE_POD_DEFAULT = True


def add_whole_pod_flag(parser: argparse.ArgumentParser) -> None:
    """`--whole-pod-on-core`: each pod's every process on its one core, as a Kubernetes CPU
    limit would hold it. Without it only a pod's worker is bound, and its API server and
    engine core (which spins for a second after each step) run on either core, taking time
    from the other pod's worker."""
    parser.add_argument(
        "--whole-pod-on-core",
        action=argparse.BooleanOptionalAction,
        default=WHOLE_POD_DEFAULT,
        help="each pod's API server and engine core on its core too, not only its worker",
    )


def start_pods(
    model: Path,
    kv_cache_bytes: int | None = None,
    max_model_len: int | None = None,
    host_offload_bytes: int = HOST_OFFLOAD_BYTES,
    whole_pod: bool = WHOLE_POD_DEFAULT,
) -> list[tuple[VLLMServer, int]]:
    """Two pods, one core each, LLMDConnector with a host tier, KV events on: (server, port of
    its event publisher). `kv_cache_bytes`: a device cache that small (None: vLLM's default),
    which must hold one request of `max_model_len` (default 2048 with a small cache);
    `host_offload_bytes` 0: no host tier; `whole_pod`: every process of a pod on its core (see
    `add_whole_pod_flag`), else only its worker's threads."""
    pods = []
    for core in ("0", "1"):
        events = free_port()
        config = VLLMServerConfig(
            model=model,
            cpu_cores=core,
            whole_server_on_cores=whole_pod,
            dtype="bfloat16",
            kv_cache_bytes=kv_cache_bytes,
            max_model_len=max_model_len or (2048 if kv_cache_bytes else 8192),
            # each answer's usage says how many prompt tokens were cached (Outcome.cached_tokens)
            extra_args=["--enable-prompt-tokens-details"],
            kv_transfer_config={
                "kv_connector": "LLMDConnector",
                "kv_role": "kv_both",
                "kv_connector_extra_config": {"host_offload_bytes": host_offload_bytes},
            },
            kv_events_config={
                "enable_kv_cache_events": True,
                "publisher": "zmq",
                "topic": "kv",
                "endpoint": f"tcp://*:{events}",
            },
        )
        pods.append((VLLMServer(config, LOG_DIR / f"pod-{core}.log").start(), events))
    for pod, _ in pods:
        pod.wait_ready()
    return pods


class RouterRun:
    """One router process for the length of one (rate, router) run."""

    def __init__(self, name: str, argv: list[str], port: int) -> None:
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        log = open(LOG_DIR / f"router-{name}.log", "ab")
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, path: str, timeout: float = 60) -> RouterRun:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"router {self.name} exited; see {LOG_DIR}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"router {self.name} not ready in {timeout} s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def ours(policy: str, pods, model: Path, flags: list[str]) -> RouterRun:
    port = free_port()
    argv = [sys.executable, "-m", "vllm_llmd.router.cli", "--port", str(port)]
    argv += ["--policy", policy, "--tokenizer", str(model), "--poll-interval-s", "0.25"]
    for pod, _ in pods:
        argv += ["--pod", pod.url]
    argv += flags
    return RouterRun(f"ours-{policy}", argv, port).wait_ready("/health")


def vllm_router(binary: str, policy: str, pods, model: Path) -> RouterRun:
    port = free_port()
    argv = [binary, "--port", str(port), "--policy", policy, "--worker-urls"]
    argv += [pod.url for pod, _ in pods]
    if policy == "kv_aware":
        for pod, events in pods:
            argv += ["--kv-event-source", f"{pod.url}=tcp://127.0.0.1:{events}"]
        argv += ["--kv-event-block-size", str(BLOCK), "--kv-event-model", str(model)]
    return RouterRun(f"vllm-router-{policy}", argv, port).wait_ready("/health")


# ---- workload -------------------------------------------------------------------------------


def make_requests(
    tokenizer, rate: float, duration: float, seed: int, args, texts: int | None = None
) -> list[tuple]:
    """(send time, prompt token ids) for one run: Poisson arrivals, shared and unique prompts.
    `seed` draws the arrivals, kinds and lengths, `texts` (default: seed) the prompts' texts:
    routers compared at one rate get the same arrivals and texts of their own."""
    rng = random.Random(seed)
    texts = seed if texts is None else texts
    prefixes = [
        tokenizer.encode(sample_text(args.prefix_tokens, texts * 100 + i)).ids[: args.prefix_tokens]
        for i in range(args.num_prefixes)
    ]
    requests, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return requests
        suffix = tokenizer.encode(sample_text(200, texts * 100_000 + len(requests))).ids
        if rng.random() < 0.8:
            prompt = rng.choice(prefixes) + suffix[: rng.randrange(16, 96)]
        else:
            prompt = suffix[: rng.randrange(100, 200)]
        requests.append((t, prompt))


async def one_request(session, url: str, model: str, prompt, args, slo) -> Outcome:
    """One streamed completion; `slo`: (TTFT s, TPOT s) sent as headers, or None for none."""
    headers = {}
    if slo is not None:
        headers["x-llm-d-slo-ttft-ms"] = str(round(slo[0] * 1000))
        headers["x-llm-d-slo-tpot-ms"] = str(round(slo[1] * 1000, 1))
    objective = getattr(args, "objective", "")  # bench_router sends none
    if objective:
        headers["x-llm-d-inference-objective"] = objective.partition("=")[0]
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": args.output_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = None
    tokens = 0
    pod = cached = None
    try:
        async with session.post(url + "/v1/completions", json=body, headers=headers) as resp:
            if resp.status == 429:
                return Outcome(False, True, None, None)
            if resp.status != 200:
                return Outcome(False, False, None, None)
            pod = resp.headers.get("X-Routed-To")
            async for line in resp.content:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                details = (chunk.get("usage") or {}).get("prompt_tokens_details") or {}
                if "cached_tokens" in details:
                    cached = details["cached_tokens"]
                if any(c.get("text") for c in chunk.get("choices", [])):
                    tokens += 1
                    if first is None:
                        first = time.perf_counter()
    except aiohttp.ClientError:
        return Outcome(False, False, None, None)
    end = time.perf_counter()
    if first is None:
        return Outcome(False, False, None, None)
    ttft = first - started
    tpot = (end - first) / max(1, tokens - 1)
    on_time = slo is None or (ttft <= slo[0] and tpot <= slo[1])
    return Outcome(on_time, False, ttft, tpot, pod, cached)


async def run_load(url: str, model: str, requests, args, slo) -> list[Outcome]:
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        start = time.perf_counter()

        async def fire(at: float, prompt) -> Outcome:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            return await one_request(session, url, model, prompt, args, slo)

        return await asyncio.gather(*(fire(at, prompt) for at, prompt in requests))


# ---- main -----------------------------------------------------------------------------------


def calibrate(pod: VLLMServer, tokenizer, args) -> tuple[float, float]:
    """(TTFT SLO, TPOT SLO) from an idle pod: cold long prompts and their decode speed."""
    cold, tpots = [], []
    for i in range(3):
        ids = tokenizer.encode(sample_text(args.prefix_tokens + 100, 990 + i)).ids
        timing = timed_stream(pod.url, pod.model_name, ids[: args.prefix_tokens + 64], 16)
        cold.append(timing.ttft_s)
        tpots.append((timing.total_s - timing.ttft_s) / 15)
    return 0.6 * statistics.median(cold), 3 * statistics.median(tpots)


def prediction_error_buckets(router_url: str) -> dict[float, float]:
    """Our router's histogram of warm predictions' |predicted - observed| / observed TTFT so
    far: cumulative count by upper bound."""
    name = "llmd:router_ttft_prediction_relative_error_bucket"
    buckets: dict[float, float] = {}
    for (sample, labels), value in scrape_metrics(router_url).items():
        if sample == name:
            le = float(dict(labels)["le"])
            buckets[le] = buckets.get(le, 0.0) + value
    return buckets


def median_prediction_error(
    buckets: dict[float, float], before: dict[float, float] | None = None
) -> float | None:
    """The median of the predictions counted in `buckets` and not in `before` (the run's, not
    the warm-up's: the models are cold then), interpolated within a bucket; None when none."""
    counts = {le: n - (before or {}).get(le, 0.0) for le, n in buckets.items()}
    total = counts.get(float("inf"), 0.0)
    if not total:
        return None
    below, lower = 0.0, 0.0
    for le in sorted(counts):
        if counts[le] >= total / 2:
            if le == float("inf"):
                return lower
            share = (total / 2 - below) / max(counts[le] - below, 1e-9)
            return lower + share * (le - lower)
        below, lower = counts[le], le
    return None


def plot(path: Path, rates: list[float], goodput, ttft_p90, slo_ttft_s: float) -> bool:
    """Goodput and p90 TTFT against offered rate, one line per router; False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    for name in goodput:
        top.plot(rates, [goodput[name][r] for r in rates], marker="o", label=name)
        bottom.plot(rates, [ttft_p90[name][r] * 1000 for r in rates], marker="o", label=name)
    top.set_ylabel("goodput (requests/s meeting both SLOs)")
    top.legend(fontsize="small")
    bottom.axhline(slo_ttft_s * 1000, color="grey", linestyle="--", label="TTFT SLO")
    bottom.set_yscale("log")
    bottom.set_ylabel("p90 TTFT (ms, log)")
    bottom.set_xlabel("offered rate (requests/s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument(
        "--rates", default="1,2,4,8,12", help="arrival rates, requests/s: past 3x saturation"
    )
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per run")
    parser.add_argument(
        "--kv-cache-mib",
        type=int,
        help="each pod's device KV cache (default: vLLM's; small enough and round robin "
        "evicts what kv_aware keeps, e.g. 48 with --preset medium, as issue #18 measured)",
    )
    parser.add_argument("--prefix-tokens", type=int, default=1536)
    parser.add_argument("--num-prefixes", type=int, default=4)
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument(
        "--warmup", type=float, default=15.0, help="unmeasured seconds of load before each run"
    )
    parser.add_argument("--vllm-router", default=shutil.which("vllm-router"))
    parser.add_argument(
        "--policies",
        default="round_robin,kv_aware,slo",
        help="our router's policies to run (comma-separated)",
    )
    parser.add_argument(
        "--objective",
        default="",
        help="NAME=PRIORITY: requests name objective NAME, our routers map it to PRIORITY "
        "(default: no objective, SLO headers only)",
    )
    parser.add_argument(
        "--router-flags", default="", help="more flags for our routers (one string, e.g. tuning)"
    )
    parser.add_argument("--slo-ttft-ms", type=float, help="TTFT SLO (default: calibrated)")
    parser.add_argument("--slo-tpot-ms", type=float, help="TPOT SLO (default: calibrated)")
    add_whole_pod_flag(parser)
    args = parser.parse_args()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    model = cached_model(args.preset, REPO_ROOT / ".cache" / "models")
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    # the longest prompt (prefix, suffix) and answer, rounded up: a small cache must hold it
    longest = args.prefix_tokens + 96 + args.output_tokens
    max_model_len = -(-longest // 256) * 256 if args.kv_cache_mib else None
    kv_cache_bytes = args.kv_cache_mib << 20 if args.kv_cache_mib else None
    pods = start_pods(model, kv_cache_bytes, max_model_len, whole_pod=args.whole_pod_on_core)
    try:
        ttft_slo, tpot_slo = calibrate(pods[0][0], tokenizer, args)
        if args.slo_ttft_ms:
            ttft_slo = args.slo_ttft_ms / 1000
        if args.slo_tpot_ms:
            tpot_slo = args.slo_tpot_ms / 1000
        slo = (ttft_slo, tpot_slo)
        objective = f"objective {args.objective.partition('=')[0]}" if args.objective else "none"
        print(f"SLOs: TTFT {slo[0] * 1000:.0f} ms, TPOT {slo[1] * 1000:.1f} ms; {objective}")
        routers = [("ours", policy) for policy in args.policies.split(",") if policy]
        if args.vllm_router:
            routers += [("vllm-router", "cache_aware"), ("vllm-router", "kv_aware")]
        else:
            print("vllm-router not found (--vllm-router PATH): its policies are left out")
        flags = ["--objective", args.objective] if args.objective else []
        flags += args.router_flags.split()
        rates = [float(r) for r in args.rates.split(",")]
        goodput: dict[str, dict[float, float]] = {}
        ttft_p90: dict[str, dict[float, float]] = {}
        header = f"{'router':28} {'rate':>5} {'good/s':>7} {'attain':>7} {'shed':>5} "
        print(header + f"{'TTFT p50':>9} {'TTFT p90':>9} {'TPOT p50':>9}  predicted TTFT error")
        for run, rate in enumerate(rates):
            for k, (kind, policy) in enumerate(routers):
                name = f"{kind} {policy}"
                # the rate's arrivals, texts of its own for each (rate, router): the pods'
                # caches keep what an earlier router's run computed (10 apart: distinct)
                texts = 1 + (run * len(routers) + k) * 10
                requests = make_requests(tokenizer, rate, args.duration, 1 + run * 10, args, texts)
                if kind == "ours":
                    router = ours(policy, pods, model, flags)
                else:
                    router = vllm_router(args.vllm_router, policy, pods, model)
                try:
                    if args.warmup > 0:  # unmeasured, own prefixes: latency models learn
                        warm_texts = 5000 + texts
                        warm = make_requests(tokenizer, rate, args.warmup, 5000, args, warm_texts)
                        asyncio.run(run_load(router.url, pods[0][0].model_name, warm, args, slo))
                    warmed = prediction_error_buckets(router.url) if kind == "ours" else {}
                    outcomes = asyncio.run(
                        run_load(router.url, pods[0][0].model_name, requests, args, slo)
                    )
                    error = whole = None
                    if kind == "ours":
                        after = prediction_error_buckets(router.url)
                        error = median_prediction_error(after, warmed)
                        whole = median_prediction_error(after)
                finally:
                    router.stop()
                good = sum(o.ok for o in outcomes)
                goodput.setdefault(name, {})[rate] = good / args.duration
                ttfts = [o.ttft_s for o in outcomes if o.ttft_s is not None] or [0.0]
                tpots = [o.tpot_s for o in outcomes if o.tpot_s is not None] or [0.0]
                ttft_p90.setdefault(name, {})[rate] = percentile(ttfts, 90)
                print(
                    f"{name:28} {rate:5.1f} {good / args.duration:7.2f} "
                    f"{good / len(outcomes):7.1%} {sum(o.shed for o in outcomes):5d} "
                    f"{percentile(ttfts, 50) * 1000:8.0f}ms "
                    f"{percentile(ttfts, 90) * 1000:8.0f}ms "
                    f"{percentile(tpots, 50) * 1000:8.1f}ms"
                    + (
                        ""
                        if error is None
                        else f"  median {error:.0%} (run; {whole:.0%} with warm-up)"
                    ),
                    flush=True,
                )
        print("\ngoodput (requests/s meeting both SLOs) by offered rate:")
        print(f"  {'router':28}" + "".join(f"{r:>7g}/s" for r in rates))
        for name, by_rate in goodput.items():
            print(f"  {name:28}" + "".join(f"{by_rate[r]:9.2f}" for r in rates))
        # round robin's peak, when it ran and served anything on time
        base = max(goodput.get("ours round_robin", {0: 0.0}).values())
        top = rates[-1]
        print(f"\npeak goodput, its ratio to round_robin's, and goodput at {top:g}/s / peak:")
        for name, by_rate in goodput.items():
            peak = max(by_rate.values())
            held = by_rate[top] / peak if peak else 0.0
            ratio = f"{peak / base:5.2f}x" if base else "  n/a "
            print(f"  {name:28} {peak:6.2f} req/s  {ratio}  held {held:6.1%}")
        png = LOG_DIR / "goodput_by_rate.png"
        if plot(png, rates, goodput, ttft_p90, slo[0]):
            print(f"plot: {png}")
    finally:
        for pod, _ in pods:
            pod.stop()


if __name__ == "__main__":
    main()
