"""The closed-loop workloads of bench_router.py, real beside simulated (bench_sim_calibration's
`--workload chat` and `--workload documents`).

- `chat`: `--users` users, each resending its conversation over one of `--num-prefixes`
  documents for `--turns` turns (bench_router's default workload);
- `documents`: `--requests` prompts, each a random document plus a question of its own,
  sent by `--users` clients (bench_router's `--workload documents`, issue #18's shape).

A client sends its next prompt when its last answer ended. Each policy runs on the real pods
through our router, then the very same prompts run through the simulator as closed-loop
requests (`SimRequest.after`). Printed per run: mean and p90 TTFT, requests per second and
prefix hit rate, real and simulated; then the medians over the rounds of each policy's ratios
to the baseline. Every request's real and simulated figures go to
`logs/bench_sim_calibration/{workload}-r{round}-{policy}.jsonl`.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from bench_router import chat_scripts, conversations, document_scripts, hit_counts
from bench_slo import ours, percentile
from sim_compare import (
    LOG_DIR,
    as_sim_requests,
    dump_requests,
    print_median_ratios,
    simulate_policy,
)

from vllm_llmd.sim.run import SimConfig
from vllm_llmd.sim.workloads import SimRequest


def closed_loop_as_sim_requests(
    scripts: list[list[list[int]]], block_size: int, output_tokens: int
) -> list[SimRequest]:
    """Every client's prompts as closed-loop requests: each client's first at 0, each later one
    sent when the one before it ended (no think time, as bench_router's clients do)."""
    prompts = [(0.0, prompt) for turns in scripts for prompt in turns]
    requests = as_sim_requests(prompts, block_size, output_tokens)
    first = 0
    for turns in scripts:
        for turn in range(1, len(turns)):
            requests[first + turn].after = first + turn - 1
        first += len(turns)
    return requests


@dataclass(frozen=True)
class ClosedLoopFigures:
    """What one policy's closed-loop run gave."""

    mean_ttft_s: float
    p90_ttft_s: float
    requests_per_s: float
    hit_rate: float


def closed_loop_run(
    policy: str, scripts, pods, model, config: SimConfig, args, dump: Path
) -> tuple[ClosedLoopFigures, ClosedLoopFigures]:
    """One policy's closed loop over `scripts`: on the real pods, then simulated; each
    request's real and simulated figures written to `dump`."""
    router = ours(policy, pods, model, args.router_flags.split())
    try:
        hit_before, total_before = hit_counts(pods)
        outcomes, took = asyncio.run(
            conversations(router.url, pods[0][0].model_name, scripts, args)
        )
        time.sleep(1.5)  # the pods' counters reach /metrics
        hit_after, total_after = hit_counts(pods)
    finally:
        router.stop()
    ttfts = [o.ttft_s for o in outcomes if o.ttft_s is not None] or [0.0]
    real = ClosedLoopFigures(
        statistics.mean(ttfts),
        percentile(ttfts, 90),
        len(outcomes) / took,
        (hit_after - hit_before) / max(1.0, total_after - total_before),
    )
    requests = closed_loop_as_sim_requests(scripts, config.pod.block_size, args.output_tokens)
    result = simulate_policy(requests, policy, config)
    dump_requests(dump, [(0.0, prompt) for turns in scripts for prompt in turns], outcomes, result)
    sim_ttfts = [o.ttft_s for o in result.outcomes]
    sim = ClosedLoopFigures(
        statistics.mean(sim_ttfts),
        percentile(sim_ttfts, 90),
        len(result.outcomes) / result.summary.sim_s,
        result.summary.hit_rate,
    )
    return real, sim


def closed_loop_ratios(policy: ClosedLoopFigures, base: ClosedLoopFigures) -> dict[str, float]:
    """A policy's figures against the baseline's (TTFT: baseline / policy; the rest: policy /
    baseline): higher is better for every one."""
    return {
        "mean TTFT": base.mean_ttft_s / policy.mean_ttft_s,
        "p90 TTFT": base.p90_ttft_s / policy.p90_ttft_s,
        "req/s": policy.requests_per_s / base.requests_per_s,
        "hit rate": policy.hit_rate / base.hit_rate if base.hit_rate else float("inf"),
    }


def compare_closed_loop(pods, model, tokenizer, config: SimConfig, args) -> None:
    """bench_router's closed-loop workload (`args.workload`: chat or documents) per policy,
    real then simulated, `--rounds` times: the policies take turns (ABBA...), each run on
    documents of its own; the ratios compared are the medians over the rounds (32 closed-loop
    requests spread a ratio by over 25% here)."""
    policies = args.policy_list
    make_scripts = chat_scripts if args.workload == "chat" else document_scripts
    print(
        f"\n{'round policy':16} {'TTFT mean':>21} {'TTFT p90':>21} {'req/s':>15} {'hit rate':>15}"
        f"\n{'':16}{'real':>10} {'sim':>10} {'real':>10} {'sim':>10} {'real':>7} {'sim':>7}"
        f" {'real':>7} {'sim':>7}"
    )
    rounds: list[dict[str, tuple[ClosedLoopFigures, ClosedLoopFigures]]] = []
    for round_ in range(args.rounds):
        order = policies if round_ % 2 == 0 else policies[::-1]
        results: dict[str, tuple[ClosedLoopFigures, ClosedLoopFigures]] = {}
        for policy in order:
            seed = 7 + round_ * len(policies) + policies.index(policy)
            scripts = make_scripts(tokenizer, seed, args)  # documents of its own per run
            dump = LOG_DIR / f"{args.workload}-r{round_ + 1}-{policy}.jsonl"
            results[policy] = r, s = closed_loop_run(
                policy, scripts, pods, model, config, args, dump
            )
            print(
                f"{round_ + 1:<5} {policy:10} {r.mean_ttft_s * 1000:8.0f} ms"
                f" {s.mean_ttft_s * 1000:7.0f} ms {r.p90_ttft_s * 1000:7.0f} ms"
                f" {s.p90_ttft_s * 1000:7.0f} ms {r.requests_per_s:7.2f} {s.requests_per_s:7.2f}"
                f" {r.hit_rate:7.1%} {s.hit_rate:7.1%}",
                flush=True,
            )
        rounds.append(results)
    print(f"\nratios to {args.baseline} (TTFT: baseline / policy, higher is better;")
    print("req/s and hit rate: policy / baseline), median over the rounds, measured and")
    print("simulated; each round's measured ratio after it:")
    for policy in policies:
        if policy == args.baseline:
            continue
        real = [closed_loop_ratios(r[policy][0], r[args.baseline][0]) for r in rounds]
        sim = [closed_loop_ratios(r[policy][1], r[args.baseline][1]) for r in rounds]
        print_median_ratios(f"{args.workload} {policy}", real, sim)
