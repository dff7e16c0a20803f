"""Router benchmark: a shared-prefix multi-turn chat workload through each router, in one run.

Two real vLLM CPU pods (small model, one core each, LLMDConnector with a host tier, KV events on)
with device caches too small to hold every shared prefix (`--kv-cache-mib`), behind, in turn:
vllm-llmd-router `round_robin`, `kv_aware` and `slo`, and vllm-router `cache_aware` and
`kv_aware` (fed by the pods' KV events) when its binary is found (`--vllm-router PATH`). With
`--epp`, also ours `kv_aware` as a Gateway API Inference Extension endpoint picker
(`--epp-port`) behind the Envoy stand-in (vllm_llmd.devtools.gateway, a process of its own),
the workload sent to the stand-in.

Workloads (closed loop; each router gets documents of its own, cold caches at its start):
- `chat` (default): `--users` users, each with one of `--num-prefixes` long system prompts
  ("documents"), hold `--turns`-turn conversations: every turn resends the whole conversation
  so far plus a new question, as chat clients do, so each turn's prompt extends the last one.
- `documents` (prefill-heavy shared documents, issue #18): `--requests` prompts, each one of the
  `--num-prefixes` documents drawn at random plus a question of its own; `--users` clients
  send them, each its next when its last answer ended. Printed per router: mean and p90
TTFT, requests per second, prefix hit rate on the pods (prompt tokens served from their cache
or tiers over all prompt tokens, from vLLM's own counters), and the router's own added latency
(median TTFT of a one-token request through the router minus straight to a pod, idle).

Usage: `.venv/bin/python benchmarks/bench_router.py [--users 8] [--turns 4] [--epp]`, or
`... --workload documents [--requests 72] [--output-tokens 4]`. `--rounds N` runs every router
N times, in turns (ABBA), each run on documents of its own, and prints the median of the
per-round ratios to round robin. `--variant=FLAGS` (repeatable) adds ours kv_aware with those
router flags, e.g. `--variant=--no-kv-room`, as one more router in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import statistics
import sys
import time

import aiohttp
from bench_slo import (
    LOG_DIR,
    REPO_ROOT,
    Outcome,
    RouterRun,
    add_whole_pod_flag,
    one_request,
    ours,
    percentile,
    start_pods,
    vllm_router,
)
from tokenizers import Tokenizer

from vllm_llmd.devtools.client import metric_sum, scrape_metrics, timed_stream
from vllm_llmd.devtools.model_maker import cached_model, sample_text
from vllm_llmd.devtools.server import free_port


def hit_counts(pods) -> tuple[float, float]:
    """(prompt tokens served from cache or tiers, all prompt tokens), summed over the pods."""
    hit = total = 0.0
    for pod, _ in pods:
        metrics = scrape_metrics(pod.url)
        name = "vllm:prompt_tokens_by_source_total"
        total += metric_sum(metrics, name)
        hit += metric_sum(metrics, name, source="local_cache_hit")
        hit += metric_sum(metrics, name, source="external_kv_transfer")
    return hit, total


def make_documents(tokenizer, seed: int, args) -> list[list[int]]:
    return [
        tokenizer.encode(sample_text(args.prefix_tokens, seed * 100 + i)).ids[: args.prefix_tokens]
        for i in range(args.num_prefixes)
    ]


def chat_scripts(tokenizer, seed: int, args) -> list[list[list[int]]]:
    """Every user's prompts, turn by turn: the conversation so far plus a new question. After
    each turn the client appends a fixed "answer" (not the model's), so the scripts are known
    before any request is sent (bench_sim_calibration replays them in the simulator)."""
    rng = random.Random(seed)
    documents = make_documents(tokenizer, seed, args)
    scripts = []
    for u in range(args.users):
        prompt = list(rng.choice(documents))
        turns = []
        for turn in range(args.turns):
            question = tokenizer.encode(sample_text(60, seed * 10_000 + u * 100 + turn)).ids
            prompt += question[:48]
            turns.append(list(prompt))
            prompt += question[48:64]  # the "answer", as the client would append it
        scripts.append(turns)
    return scripts


def document_scripts(tokenizer, seed: int, args) -> list[list[list[int]]]:
    """The shared-document workload as every client's prompts in order: `--requests` prompts,
    each a random document plus a question of its own, dealt to the clients in turn."""
    rng = random.Random(seed)
    documents = make_documents(tokenizer, seed, args)
    prompts = []
    for i in range(args.requests):
        question = tokenizer.encode(sample_text(60, seed * 10_000 + i)).ids[:48]
        prompts.append(list(rng.choice(documents)) + question)
    return [prompts[u :: args.users] for u in range(args.users)]


async def conversations(
    url: str, model: str, scripts: list[list[list[int]]], args
) -> tuple[list[Outcome], float]:
    """Every user's conversation, users concurrent, turns in sequence (closed loop): the
    outcomes and the seconds until the last answer ended."""
    timeout = aiohttp.ClientTimeout(total=600)
    start = time.perf_counter()
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def user(turns: list[list[int]]) -> list[Outcome]:
            return [await one_request(session, url, model, prompt, args, None) for prompt in turns]

        results = await asyncio.gather(*(user(turns) for turns in scripts))
    return [o for per_user in results for o in per_user], time.perf_counter() - start


def added_latency(router_url: str, pod, repeats: int = 30) -> float:
    """Median TTFT through the router minus straight to the pod, one-token idle requests."""
    prompt = [11, 12, 13, 14]
    via, direct = [], []
    for _ in range(repeats):
        direct.append(timed_stream(pod.url, pod.model_name, prompt, 1).ttft_s)
        via.append(timed_stream(router_url, pod.model_name, prompt, 1).ttft_s)
    return statistics.median(via) - statistics.median(direct)


def envoy_stand_in(epp_port: int) -> RouterRun:
    """The Envoy stand-in before the endpoint picker on epp_port, a process of its own (as
    Envoy is); ready once a request through it reaches a pod (GET /health)."""
    port = free_port()
    argv = [sys.executable, "-m", "vllm_llmd.devtools.gateway", "--port", str(port)]
    argv += ["--epp", f"127.0.0.1:{epp_port}"]
    return RouterRun("envoy-stand-in", argv, port).wait_ready("/health")


def run_router(
    kind: str, policy: str, flags: list[str], run: int, pods, model, tokenizer, args
) -> tuple[str, float]:
    """One router over the workload (documents of its own, seeded by `run`): prints its row,
    returns its name and mean TTFT."""
    name = " ".join([kind, policy, *flags]).replace("--", "")
    with contextlib.ExitStack() as running:
        if kind == "vllm-router":
            router = vllm_router(args.vllm_router, policy, pods, model)
        else:
            epp_port = free_port()
            epp = ["--epp-port", str(epp_port)] if kind == "epp" else []
            router = ours(policy, pods, model, [*flags, *epp])
        running.callback(router.stop)
        if kind == "epp":  # the clients go to the stand-in, which asks the picker
            name, router = f"ours {policy} via EPP", envoy_stand_in(epp_port)
            running.callback(router.stop)
        hit_before, total_before = hit_counts(pods)
        make_scripts = chat_scripts if args.workload == "chat" else document_scripts
        scripts = make_scripts(tokenizer, 7 + run, args)
        outcomes, took = asyncio.run(
            conversations(router.url, pods[0][0].model_name, scripts, args)
        )
        time.sleep(1.5)  # the pods' counters reach /metrics
        hit_after, total_after = hit_counts(pods)
        added = added_latency(router.url, pods[0][0])
    ttfts = [o.ttft_s for o in outcomes if o.ttft_s is not None] or [0.0]
    failed = sum(o.ttft_s is None for o in outcomes)
    hit_rate = (hit_after - hit_before) / max(1.0, total_after - total_before)
    print(
        f"{name:28} {statistics.mean(ttfts) * 1000:8.0f}ms "
        f"{percentile(ttfts, 90) * 1000:7.0f}ms "
        f"{len(outcomes) / took:6.2f} {hit_rate:9.1%} {added * 1000:6.1f}ms"
        + (f"  ({failed} failed)" if failed else ""),
        flush=True,
    )
    return name, statistics.mean(ttfts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--workload", choices=["chat", "documents"], default="chat")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4, help="chat: turns per user")
    parser.add_argument("--requests", type=int, default=72, help="documents: requests in all")
    parser.add_argument(
        "--rounds", type=int, default=1, help="runs of every router, in turns (ABBA)"
    )
    parser.add_argument("--prefix-tokens", type=int, default=1280)
    parser.add_argument("--num-prefixes", type=int, default=6)
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument(
        "--kv-cache-mib", type=int, default=24, help="device KV cache per pod (small: 5 KiB/token)"
    )
    parser.add_argument(
        "--host-tier-mib", type=int, default=256, help="host tier per pod (0: none)"
    )
    parser.add_argument("--vllm-router", default=shutil.which("vllm-router"))
    parser.add_argument(
        "--w-load",
        type=float,
        nargs="*",
        default=[],
        help="also run ours kv_aware with each of these --w-load values (default 0.5)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="FLAGS",
        help='also run ours kv_aware with these router flags (repeatable), e.g. "--kv-room"',
    )
    parser.add_argument(
        "--only-kv-aware", action="store_true", help="skip round_robin and slo (tuning runs)"
    )
    parser.add_argument(
        "--epp",
        action="store_true",
        help="also run ours kv_aware as an endpoint picker behind the Envoy stand-in",
    )
    add_whole_pod_flag(parser)
    args = parser.parse_args()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    model = cached_model(args.preset, REPO_ROOT / ".cache" / "models")
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    pods = start_pods(
        model,
        kv_cache_bytes=args.kv_cache_mib << 20,
        host_offload_bytes=args.host_tier_mib << 20,
        whole_pod=args.whole_pod_on_core,
    )
    routers = [("ours", "kv_aware", [])]
    if not args.only_kv_aware:
        routers = [("ours", "round_robin", []), *routers, ("ours", "slo", [])]
    routers += [("ours", "kv_aware", ["--w-load", str(w)]) for w in args.w_load]
    routers += [("ours", "kv_aware", flags.split()) for flags in args.variant]
    if args.epp:
        routers.append(("epp", "kv_aware", []))
    if args.vllm_router:
        routers += [("vllm-router", "cache_aware", []), ("vllm-router", "kv_aware", [])]
    else:
        print("vllm-router not found (--vllm-router PATH): its policies are left out")
    if args.workload == "chat":
        shape = f"{args.users} users x {args.turns} turns"
    else:
        shape = f"{args.requests} requests, {args.users} at once"
    print(
        f"{args.workload}: {shape} over {args.num_prefixes} documents of {args.prefix_tokens} "
        f"tokens, {args.output_tokens} output tokens; device cache {args.kv_cache_mib} MiB, "
        f"host tier {args.host_tier_mib} MiB per pod"
    )
    print(
        f"{'router':28} {'TTFT mean':>10} {'TTFT p90':>9} {'req/s':>6} {'hit rate':>9} {'added':>8}"
    )
    # router name -> its mean TTFT in each round
    mean_ttfts: dict[str, list[float]] = {}
    try:
        for round_ in range(args.rounds):
            order = routers if round_ % 2 == 0 else routers[::-1]  # ABBA: drift evens out
            for kind, policy, flags in order:
                run = round_ * len(routers) + routers.index((kind, policy, flags))
                name, mean_ttft = run_router(kind, policy, flags, run, pods, model, tokenizer, args)
                mean_ttfts.setdefault(name, []).append(mean_ttft)
        baseline = mean_ttfts.get("ours round_robin")
        if baseline:
            print(
                "\nmean TTFT, round robin's over each router's (higher is better)"
                + (", median over the rounds (each round's):" if args.rounds > 1 else ":")
            )
            for name, means in mean_ttfts.items():
                ratios = [base / mean for base, mean in zip(baseline, means, strict=True)]
                each = f"  ({', '.join(f'{r:.2f}' for r in ratios)})" if args.rounds > 1 else ""
                print(f"  {name:28} {statistics.median(ratios):5.2f}x{each}")
    finally:
        for pod, _ in pods:
            pod.stop()


if __name__ == "__main__":
    main()
