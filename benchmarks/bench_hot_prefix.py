"""Hot-prefix benchmark: a shared prefix that turns hot on one pod, through each router, in one run.

Two real vLLM CPU pods (one core each, LLMDConnector with a host tier, KV events on; see
bench_slo.start_pods) behind, in turn, vllm-llmd-router `round_robin`, `kv_aware` (today's
default) and `kv_aware --replicate-hot-prefixes N` (a hot prefix copied ahead of demand,
router/replication.py), and ours kv_aware with each `--variant=FLAGS`.

Workload (open loop, Poisson arrivals at `--rate` for `--duration` s): `--hot-share` of the
requests are the hot document of the moment (`--prefix-tokens`) plus a short unique question,
and a new document turns hot every `--hot-period` s (a new system prompt rolled out, an article
everyone asks about): its first request lands on one pod, which then holds what all the hot
traffic wants. The rest are one of `--num-cold` other documents plus a question (traffic a
prefix-aware router keeps apart and round robin scatters). Each router gets documents of its
own. Every request streams `--output-tokens` tokens. Printed per router:
mean, p50 and p90 TTFT, the share within the TTFT SLO (`--slo-ttft-ms`, sent in llm-d's
header), the pods' prefix hit rate, how many requests failed, the hot-prefix
copies the router made, its idle bound, and the mean TTFT ratios of the others against each
router.

The idle bound is what routing could at best have made of a router's run: its mean TTFT were
every request answered as on an idle pod holding its document (`idle_hit_s`, measured at the
start), except a document's first request and those that arrived while it was being computed,
which no router can serve sooner (nobody holds their document yet) and which keep their
measured TTFT. A router's mean over its bound is how many times better any routing of that
run could be.

Usage: `.venv/bin/python benchmarks/bench_hot_prefix.py [--rate 6] [--duration 60] [--repeats 2]`.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

from bench_router import hit_counts
from bench_slo import (
    LOG_DIR,
    REPO_ROOT,
    add_whole_pod_flag,
    ours,
    percentile,
    run_load,
    start_pods,
)
from tokenizers import Tokenizer

from vllm_llmd.devtools.client import metric_sum, scrape_metrics, timed_stream
from vllm_llmd.devtools.model_maker import cached_model, sample_text


def document(tokenizer, tokens: int, seed: int) -> list[int]:
    return tokenizer.encode(sample_text(tokens, seed)).ids[:tokens]


def make_requests(tokenizer, seed: int, args, texts: int) -> list[tuple[float, list[int]]]:
    """(send time, prompt) for one run: the hot document or a cold one, plus a question.
    `seed` draws the arrivals and which document each request names, `texts` the documents'
    and questions' texts: every router gets the same arrivals and documents of its own."""
    rng = random.Random(seed)
    cold = [document(tokenizer, args.prefix_tokens, texts * 100 + i) for i in range(args.num_cold)]
    num_hot = int(args.duration // args.hot_period) + 1
    hot = [document(tokenizer, args.prefix_tokens, texts * 100 + 50 + i) for i in range(num_hot)]
    requests: list[tuple[float, list[int]]] = []
    t = 0.0
    while True:
        t += rng.expovariate(args.rate)
        if t >= args.duration:
            return requests
        question = tokenizer.encode(sample_text(80, texts * 100_000 + len(requests))).ids[:48]
        now_hot = hot[int(t // args.hot_period)]
        prefix = now_hot if rng.random() < args.hot_share else rng.choice(cold)
        requests.append((t, prefix + question))


def idle_hit_s(pod, tokenizer, args) -> float:
    """TTFT of a document-plus-question prompt on an idle pod that holds the document."""
    doc = document(tokenizer, args.prefix_tokens, 999)
    ttfts = []
    for i in range(6):
        question = tokenizer.encode(sample_text(80, 999_000 + i)).ids[:48]
        ttfts.append(timed_stream(pod.url, pod.model_name, doc + question, 1).ttft_s)
    return statistics.median(ttfts[1:])  # the first computes the document


def idle_bound_s(requests, ttfts: list[float | None], idle_hit: float, doc_tokens: int) -> float:
    """The run's mean TTFT were every request answered in `idle_hit` except each document's
    first request and those that arrived before it answered (see the module's docstring)."""
    first_answer: dict[tuple[int, ...], float] = {}
    total = 0.0
    for (at, prompt), ttft in zip(requests, ttfts, strict=True):
        if ttft is None:  # failed: counts as an idle hit
            total += idle_hit
            continue
        doc = tuple(prompt[:doc_tokens])
        if doc not in first_answer:
            first_answer[doc] = at + ttft
            total += ttft
        elif at < first_answer[doc]:
            total += ttft
        else:
            total += idle_hit
    return total / max(1, len(requests))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--rate", type=float, default=3.0)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--hot-share", type=float, default=0.8)
    parser.add_argument("--hot-period", type=float, default=10.0)
    parser.add_argument("--num-cold", type=int, default=6)
    parser.add_argument("--prefix-tokens", type=int, default=1280)
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument(
        "--kv-cache-mib", type=int, default=64, help="device KV cache per pod (small: 5 KiB/token)"
    )
    parser.add_argument(
        "--slo-ttft-ms",
        type=float,
        default=500.0,
        help="the TTFT SLO every request names (x-llm-d-slo-ttft-ms; a copy is made when the "
        "holder is predicted to miss it)",
    )
    parser.add_argument(
        "--host-tier-mib", type=int, default=256, help="host tier per pod (0: none)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs of each kv_aware router")
    parser.add_argument(
        "--replicate-after", type=int, default=3, help="--replicate-hot-prefixes of the third"
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="FLAGS",
        help="also run ours kv_aware with these router flags (repeatable; after each kv_aware "
        'pair), e.g. "--variant=--pull-from-holders"',
    )
    add_whole_pod_flag(parser)
    args = parser.parse_args()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    model = cached_model(args.preset, REPO_ROOT / ".cache" / "models")
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    # a prompt is a document, a question of up to 48 tokens, and the answer
    max_model_len = max(2048, -(-(args.prefix_tokens + 48 + args.output_tokens) // 256) * 256)
    pods = start_pods(
        model,
        kv_cache_bytes=args.kv_cache_mib << 20,
        max_model_len=max_model_len,
        host_offload_bytes=args.host_tier_mib << 20,
        whole_pod=args.whole_pod_on_core,
    )
    model_name = pods[0][0].model_name
    idle_hit = idle_hit_s(pods[0][0], tokenizer, args)
    replicating = ("kv_aware", ["--replicate-hot-prefixes", str(args.replicate_after)])
    # round robin once; the two kv_aware routers in turn, --repeats times (this box drifts)
    variants = [("kv_aware", flags.split()) for flags in args.variant]
    routers = [("round_robin", []), *[("kv_aware", []), replicating, *variants] * args.repeats]
    print(
        f"{args.rate}/s for {args.duration:.0f} s; {args.hot_share:.0%} on the hot document of "
        f"{args.prefix_tokens} tokens (a new one every {args.hot_period:.0f} s), the rest on "
        f"{args.num_cold} cold ones; device cache {args.kv_cache_mib} MiB, host tier "
        f"{args.host_tier_mib} MiB per pod; an idle pod answers a held document in "
        f"{idle_hit * 1000:.0f} ms",
        flush=True,
    )
    columns = f"{'TTFT mean':>10} {'p50':>7} {'p90':>7} {'in SLO':>8} {'hit rate':>9} {'failed':>7}"
    columns += f" {'copies':>7} {'idle bound':>11}"
    print(f"{'router':38} {columns}")
    slo = (args.slo_ttft_ms / 1000, 3600.0)  # TTFT only: the TPOT SLO never binds
    means: dict[str, list[float]] = {}
    try:
        for run, (policy, flags) in enumerate(routers):
            name = " ".join([policy, *flags]).replace("--", "")
            router = ours(policy, pods, model, flags)
            try:
                requests = make_requests(tokenizer, 31, args, texts=31 + run)
                hit_before, total_before = hit_counts(pods)
                outcomes = asyncio.run(run_load(router.url, model_name, requests, args, slo))
                time.sleep(1.5)  # the pods' counters reach /metrics
                hit_after, total_after = hit_counts(pods)
                copies = metric_sum(scrape_metrics(router.url), "llmd:router_prefix_copies_total")
            finally:
                router.stop()
            bound = idle_bound_s(
                requests, [o.ttft_s for o in outcomes], idle_hit, args.prefix_tokens
            )
            ttfts = [o.ttft_s for o in outcomes if o.ttft_s is not None] or [0.0]
            failed = sum(o.ttft_s is None for o in outcomes)
            on_time = sum(o.ok for o in outcomes) / max(1, len(outcomes))
            hit_rate = (hit_after - hit_before) / max(1.0, total_after - total_before)
            means.setdefault(name, []).append(statistics.mean(ttfts))
            print(
                f"{name:38} {means[name][-1] * 1000:8.0f}ms {percentile(ttfts, 50) * 1000:5.0f}ms "
                f"{percentile(ttfts, 90) * 1000:5.0f}ms {on_time:8.1%} {hit_rate:9.1%} {failed:7d} "
                f"{copies:7.0f} {bound * 1000:6.0f}ms "
                f"({means[name][-1] / bound:.2f}x)",
                flush=True,
            )
    finally:
        for pod, _ in pods:
            pod.stop()
    print("\nmean TTFT (mean over a router's runs), how many times better than:")
    overall = {name: statistics.mean(runs) for name, runs in means.items()}
    for name, mean in overall.items():
        others = ", ".join(
            f"{other} {overall[other] / mean:.2f}x" for other in overall if other != name
        )
        print(f"  {name}: {others}")


if __name__ == "__main__":
    main()
