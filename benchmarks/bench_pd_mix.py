"""P/D mix benchmark: remote prefill decided per request by predicted cost, against always and
never, on a mix of short and long prompts, in one run.

One prefill pod (LLMDConnector `kv_producer`, core 0) and one decode pod (`kv_consumer`, a failed
pull recomputed; core 1), real vLLM CPU servers (bf16), behind vllm-llmd-router (`kv_aware`,
pods given as role=prefill and role=decode), started once per system:
- never: `--pd-threshold-tokens` above the longest prompt. No P/D is ever taken, so the prefill
  latency model never warms and the threshold decides every request: the decode pod computes
  every prompt while the prefill pod idles;
- always: `--pd-threshold-tokens 0`. Every prompt goes prefill -> decode; the direct model never
  sees a prompt, so `has_seen` keeps the threshold in charge;
- threshold: the old fixed rule, `--pd-threshold-tokens` between the short and the long prompts
  (`--threshold-tokens`). No long prompt is ever served direct, so the cost model never sees
  one both ways and the threshold sends every long prompt P/D; short ones go by predicted cost
  (almost always direct). Not a rule a user can tune for every mix, but on this one it is what
  a rule that knew the lengths would do;
- by cost: the router's own rule (`worth_a_remote_prefill`): P/D when the prefill pod's step
  (its queue and the prompt) plus the decode pod's TTFT after the transfer is predicted below
  the decode pod computing alone (its queue and the prompt). Its fallback threshold is also
  above the longest prompt, so each P/D it takes in the measured phase is the model's choice.

Warm-up (unmeasured, before each system's run): `--warmup` requests of the same mix and rate on
prompts of their own. Under a threshold a prompt of a given length is only ever served one way,
and the router predicts a length only once it has seen it both ways (`has_seen`: no
extrapolation), so for by cost every other warm-up request of each kind names the prefill pod in
llm-d's `x-prefiller-host-port` header (P/D) and the rest go direct; the longest prompt length is
among both. The other two routers serve the same warm-up by their own rule (it warms the pods).

Workload: `--requests` requests, Poisson arrivals at `--rate`, `--long-share` of them long
(`--long-tokens`, default 1500-2000) and the rest short (`--short-tokens`, 50-100), each
streaming `--output-tokens` tokens. Every system gets the same arrival times, kinds and lengths;
its token ids are offset (as bench_pd does), so no system finds another's prefixes cached.

Printed: mean, p50 and p90 TTFT (client side, through the router), mean TTFT of short and long
prompts, the share of requests that went P/D (from the router's audit log), the ratios of by
cost's mean TTFT to always's and never's, and the router's median TTFT prediction error (its
histogram, warm-up and run, as bench_slo prints it).

Usage: `.venv/bin/python benchmarks/bench_pd_mix.py [--rate 1.5] [--requests 120] [--warmup 40]`.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_pd import start_all
from bench_slo import (
    RouterRun,
    add_whole_pod_flag,
    median_prediction_error,
    percentile,
    prediction_error_buckets,
)
from tokenizers import Tokenizer

from vllm_llmd.devtools.client import HTTPStatusError, metric_sum, scrape_metrics, timed_stream
from vllm_llmd.devtools.model_maker import PRESETS, cached_model, sample_text
from vllm_llmd.devtools.server import VLLMServer, VLLMServerConfig, free_port, llmd_connector

REPO_ROOT = Path(__file__).resolve().parents[1]
LOG_DIR = REPO_ROOT / "logs" / "bench_pd_mix"
SYSTEMS = ("never", "always", "threshold", "by_cost")


@dataclass(frozen=True)
class Request:
    at_s: float  # send time, seconds after the run's start
    long: bool
    prompt: list[int]


@dataclass(frozen=True)
class Result:
    request_id: str
    long: bool
    ttft_s: float | None  # None: the request failed
    pd: bool = False  # the router ran it prefill -> decode (from its audit log)
    prefill_s: float | None = None  # its prefill step's time, for P/D (the audit's prefill_s)


# ---- processes ------------------------------------------------------------------------------


def start_pods(model: Path, whole_pod: bool) -> tuple[VLLMServer, VLLMServer]:
    """(prefill pod on core 0, decode pod on core 1), started and ready; `whole_pod`: each
    pod's every process on its core, not only its worker's threads."""
    producer = llmd_connector("kv_producer")
    consumer = llmd_connector("kv_consumer", kv_load_failure_policy="recompute")

    def server(name: str, core: str, connector: dict[str, Any]) -> VLLMServer:
        config = VLLMServerConfig(
            model=model,
            dtype="bfloat16",
            cpu_cores=core,
            whole_server_on_cores=whole_pod,
            kv_transfer_config=connector,
        )
        return VLLMServer(config, LOG_DIR / f"{name}.log")

    pods = (server("prefill", "0", producer), server("decode", "1", consumer))
    try:
        start_all(list(pods))
    except BaseException:
        for pod in pods:
            pod.stop()
        raise
    return pods


def start_router(
    name: str, prefill: VLLMServer, decode: VLLMServer, model: Path, threshold: int
) -> tuple[RouterRun, Path]:
    """Our router in front of the pair, with an audit log (how each request was routed)."""
    port = free_port()
    audit = LOG_DIR / f"audit-{name}.jsonl"
    audit.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "vllm_llmd.router.cli", "--port", str(port)]
    argv += ["--tokenizer", str(model), "--poll-interval-s", "0.25"]
    argv += ["--pod", f"{prefill.url},role=prefill", "--pod", f"{decode.url},role=decode"]
    argv += ["--pd-threshold-tokens", str(threshold), "--audit-log", str(audit)]
    return RouterRun(f"pd-mix-{name}", argv, port).wait_ready("/health"), audit


# ---- workload -------------------------------------------------------------------------------


def make_requests(
    tokenizer: Tokenizer, args: argparse.Namespace, count: int, seed: int, offset: int
) -> list[Request]:
    """Poisson arrivals of short and long unique prompts; token ids shifted by `offset`."""
    rng = random.Random(seed)
    requests, at = [], 0.0
    for i in range(count):
        at += rng.expovariate(args.rate)
        long = rng.random() < args.long_share
        low, high = args.long_tokens if long else args.short_tokens
        length = rng.randint(low, high)
        ids = tokenizer.encode(sample_text(length, seed * 100_000 + i)).ids[:length]
        assert len(ids) == length, "sample_text gave too few tokens"
        requests.append(Request(at, long, [(t + offset) % 4000 for t in ids]))
    return requests


def longest_both_ways(requests: list[Request], longest: int) -> list[Request]:
    """The warm-up with its first two long prompts at the longest length (one of them goes
    each way), so `has_seen` covers every measured prompt."""
    out, stretched = [], 0
    for r in requests:
        if r.long and stretched < 2:
            prompt = (r.prompt * 2)[:longest]
            r, stretched = Request(r.at_s, True, prompt), stretched + 1
        out.append(r)
    return out


def run_load(
    url: str,
    model: str,
    requests: Sequence[Request],
    output_tokens: int,
    tag: str,
    prefiller: str | None = None,
) -> list[Result]:
    """Send each request at its time (threads: arrivals do not wait for answers). With
    `prefiller` (host:port), every other request of each kind names it as the prefill pod."""
    seen = {True: 0, False: 0}

    def one(request_id: str, request: Request, headers: dict[str, str]) -> Result:
        try:
            timing = timed_stream(url, model, request.prompt, output_tokens, headers=headers)
        except (HTTPStatusError, OSError) as exc:
            print(f"  {request_id} failed: {exc}", flush=True)
            return Result(request_id, request.long, None)
        return Result(request_id, request.long, timing.ttft_s)

    with ThreadPoolExecutor(max_workers=64) as pool:
        futures = []
        start = time.perf_counter()
        for i, request in enumerate(requests):
            request_id = f"{tag}-{i}"
            headers = {"X-Request-Id": request_id}
            if prefiller is not None and seen[request.long] % 2 == 0:
                headers["x-prefiller-host-port"] = prefiller
            seen[request.long] += 1
            time.sleep(max(0.0, start + request.at_s - time.perf_counter()))
            futures.append(pool.submit(one, request_id, request, headers))
        return [f.result() for f in futures]


def with_routes(results: list[Result], audit: Path) -> list[Result]:
    """Each result marked with whether the router took P/D for it (and the prefill answered)."""
    pd: dict[str, tuple[bool, float | None]] = {}
    for line in audit.read_text().splitlines():
        record = json.loads(line)
        prefilled = record["kind"] == "pd" and bool(record.get("prefilled"))
        pd[record["request_id"]] = (prefilled, record.get("prefill_s"))
    return [
        Result(r.request_id, r.long, r.ttft_s, *pd.get(r.request_id, (False, None)))
        for r in results
    ]


def pull_totals(decode: VLLMServer) -> tuple[float, float]:
    """(seconds, count) of the decode pod's P/D pulls so far (llmd:pd_pull_seconds)."""
    samples = scrape_metrics(decode.url)
    name = "llmd:pd_pull_seconds"
    return metric_sum(samples, f"{name}_sum"), metric_sum(samples, f"{name}_count")


def pd_split(name: str, results: list[Result], pull_ms: float | None = None) -> str | None:
    """Where a P/D route's TTFT went, per prompt kind: the prefill step, then the rest (the
    decode pod's pull and first token, and the hops between)."""
    parts = []
    for long in (False, True):
        pd = [r for r in results if r.pd and r.long == long and r.ttft_s and r.prefill_s]
        if pd:
            prefill = statistics.mean(r.prefill_s or 0.0 for r in pd) * 1000
            after = statistics.mean((r.ttft_s or 0.0) - (r.prefill_s or 0.0) for r in pd) * 1000
            kind = "long" if long else "short"
            parts.append(f"{kind} {prefill:.0f} + {after:.0f} ms ({len(pd)})")
    if not parts:
        return None
    pulls = "" if pull_ms is None else f"; pulls took {pull_ms:.0f} ms on average"
    return f"  {name:<9}P/D TTFT = prefill step + the rest: {'; '.join(parts)}{pulls}"


# ---- main -----------------------------------------------------------------------------------


def tokens_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    return int(low), int(high or low)


def summary_row(name: str, results: list[Result], error: float | None) -> str:
    ok = [r for r in results if r.ttft_s is not None]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]

    def mean_ms(long: bool) -> str:
        values = [r.ttft_s for r in ok if r.long == long and r.ttft_s is not None]
        return f"{statistics.mean(values) * 1000:7.0f}" if values else f"{'-':>7}"

    def pd_share(long: bool) -> str:
        kind = [r for r in ok if r.long == long]
        return f"{sum(r.pd for r in kind) / len(kind):4.0%}" if kind else "   -"

    share = sum(r.pd for r in ok) / len(ok) if ok else 0.0
    return (
        f"  {name:<9}{statistics.mean(ttfts) * 1000:7.0f}{percentile(ttfts, 50) * 1000:7.0f}"
        f"{percentile(ttfts, 90) * 1000:7.0f}{mean_ms(False)}{mean_ms(True)}"
        f"{share:7.0%} {pd_share(False)}/{pd_share(True)}{len(results) - len(ok):6d}"
        + ("" if error is None else f"{error:9.0%}")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--rate", type=float, default=1.5, help="Poisson arrivals, requests/s")
    parser.add_argument("--requests", type=int, default=120, help="measured requests per system")
    parser.add_argument("--warmup", type=int, default=40, help="unmeasured requests before each")
    parser.add_argument("--long-share", type=float, default=0.3)
    parser.add_argument("--short-tokens", type=tokens_range, default=(50, 100), metavar="LO-HI")
    parser.add_argument("--long-tokens", type=tokens_range, default=(1500, 2000), metavar="LO-HI")
    parser.add_argument("--output-tokens", type=int, default=8)
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="which, in this order")
    parser.add_argument(
        "--threshold-tokens",
        type=int,
        default=1000,
        help="the threshold system's --pd-threshold-tokens (between short and long prompts)",
    )
    parser.add_argument(
        "--by-cost-threshold",
        type=int,
        help="by cost's fallback --pd-threshold-tokens while its models are cold (default: "
        "above the longest prompt, so every P/D it takes is the cost model's choice)",
    )
    add_whole_pod_flag(parser)
    args = parser.parse_args()
    systems = [s for s in args.systems.split(",") if s]
    assert set(systems) <= set(SYSTEMS), f"systems are {SYSTEMS}"
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    model = cached_model(args.preset, REPO_ROOT / ".cache" / "models")
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    longest = args.long_tokens[1]
    never = longest + 1  # the threshold counts uncached tokens strictly above it
    thresholds = {
        "never": never,
        "always": 0,
        "threshold": args.threshold_tokens,
        "by_cost": args.by_cost_threshold or never,
    }

    prefill, decode = start_pods(model, args.whole_pod_on_core)
    results: dict[str, list[Result]] = {}
    errors: dict[str, float | None] = {}
    pull_ms: dict[str, float | None] = {}
    try:
        for k, name in enumerate(systems, start=1):
            # the same arrivals, kinds and lengths for every system; its own token ids
            measured = make_requests(tokenizer, args, args.requests, seed=1, offset=k)
            warm = make_requests(tokenizer, args, args.warmup, seed=2, offset=k)
            router, audit = start_router(name, prefill, decode, model, thresholds[name])
            try:
                prefiller = None
                if name == "by_cost":
                    warm = longest_both_ways(warm, longest)
                    prefiller = prefill.url.removeprefix("http://")
                run_load(router.url, decode.model_name, warm, args.output_tokens, "warm", prefiller)
                pulls_before = pull_totals(decode)
                run = run_load(router.url, decode.model_name, measured, args.output_tokens, "run")
                pulled_s, pulls = pull_totals(decode)
                pulled_s, pulls = pulled_s - pulls_before[0], pulls - pulls_before[1]
                pull_ms[name] = pulled_s / pulls * 1000 if pulls else None
                results[name] = with_routes(run, audit)
                errors[name] = median_prediction_error(prediction_error_buckets(router.url))
            finally:
                router.stop()
            print(summary_row(name, results[name], errors[name]), flush=True)
    finally:
        prefill.stop()
        decode.stop()

    print(
        f"\n== {args.requests} requests per system at {args.rate:g}/s, "
        f"{args.long_share:.0%} long ({args.long_tokens[0]}-{args.long_tokens[1]} tokens), "
        f"short {args.short_tokens[0]}-{args.short_tokens[1]}, {args.output_tokens} output "
        f"tokens; {args.preset} model, bf16, prefill pod core 0, decode pod core 1 (TTFT ms)"
    )
    print(
        f"  {'system':<9}{'mean':>7}{'p50':>7}{'p90':>7}{'short':>7}{'long':>7}"
        f"{'P/D':>7} {'shrt/long':>9}{'failed':>6}  pred. error (median)"
    )
    for name, system_results in results.items():
        print(summary_row(name, system_results, errors[name]))
    for name, system_results in results.items():
        split = pd_split(name, system_results, pull_ms[name])
        if split:
            print(split)
    if "by_cost" in results:
        by_cost = statistics.mean(r.ttft_s for r in results["by_cost"] if r.ttft_s is not None)
        for other in ("always", "never"):
            if other in results:
                mean = statistics.mean(r.ttft_s for r in results[other] if r.ttft_s is not None)
                print(f"  by cost vs {other}: mean TTFT {by_cost / mean:.2f}x")


if __name__ == "__main__":
    main()
