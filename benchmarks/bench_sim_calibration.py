"""Simulator against the real thing: bench_slo's and bench_router's two-pod workloads, measured on
real vLLM pods and simulated on a profile calibrated from the same pods, the ratios between
policies side by side.

1. Two real vLLM CPU pods, as `bench_slo.py` starts them (small model, bf16, one core each,
   LLMDConnector with a host tier, KV events on).
2. `vllm_llmd.sim.calibrate` measures one of them (`vllm-llmd-sim calibrate`'s sweeps) and fits
   the latency profile the simulator uses; the pod's device cache size comes from its
   `vllm:cache_config_info`, its batch limits are vLLM's CPU serving defaults (2048 batched
   tokens, 128 sequences), its SLOs are bench_slo's (calibrated the same way). With
   `--router-dispatch`, the time our router adds to an idle request (bench_router's
   `added_latency`) is what the simulated router spends on each request before its pod has it
   (`RouterSettings.dispatch_s`).
3. For each rate in `--rates` and each policy in `--policies`: bench_slo's open-loop workload
   (Poisson arrivals, 80% on one of four 1536-token prefixes plus a short suffix, 20% short
   unique, 16 output tokens; prefixes of its own per run) sent through our router to the real
   pods, then the very same requests (token ids hashed into vLLM's block chain) through the
   simulator: the router's own policy code over two simulated pods. Each run starts with
   `--warmup` seconds of the same load on prefixes of its own, unmeasured (as bench_slo's),
   which the simulator replays first too.
4. It prints, per rate and policy, mean and p90 TTFT and goodput for both, then each policy's
   ratio to `--baseline` (round robin) measured and simulated, and how far apart they are: the
   issue's goal is within 25%.

`--workload chat` and `--workload documents` compare `bench_router.py`'s closed-loop workloads
instead (`sim_closed_loop.py`), on pods with `--kv-cache-mib` device caches and
`--host-tier-mib` host tiers: the simulator replays the very same prompts as closed-loop
requests, its pods with the real pods' block count and a host tier of the same bytes (loads at
`--host-gbps`). Printed: mean and p90 TTFT, requests per second and prefix hit rate, real and
simulated, then the ratios to the baseline. Every run writes each request's real and simulated
figures side by side to `logs/bench_sim_calibration/` (`sim_compare.dump_requests`).

Not modelled by the simulator, and so part of what the comparison measures: the router and the
client sharing this box's two cores with the pods, the host tier (the device caches here hold
every prefix of a run), and HTTP hops.

Usage: `.venv/bin/python benchmarks/bench_sim_calibration.py [--rates 2,4] [--duration 30]`, or
`... --workload chat [--users 8] [--turns 4] [--rounds 5] [--profile-lengths 128,512,1024,1536]
[--profile-batches 1,2,3]` (calibration batches that fit the small device cache), or
`... --workload documents --host-tier-mib 0 --output-tokens 4 [--requests 72] ...`. With
`--rounds N` (any workload), every policy runs N times, in turns, and the ratios compared are
the medians over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
from dataclasses import dataclass

from bench_router import added_latency
from bench_slo import (
    BLOCK,
    REPO_ROOT,
    Outcome,
    add_whole_pod_flag,
    make_requests,
    ours,
    percentile,
    run_load,
    start_pods,
)
from bench_slo import calibrate as calibrate_slos
from sim_closed_loop import compare_closed_loop
from sim_compare import (
    LOG_DIR,
    as_sim_requests,
    device_blocks,
    dump_requests,
    print_median_ratios,
    simulate_policy,
)
from tokenizers import Tokenizer

from vllm_llmd.devtools.client import get_text
from vllm_llmd.devtools.model_maker import cached_model
from vllm_llmd.router.pod_verification import cache_config_info
from vllm_llmd.router.slo import SLO
from vllm_llmd.sim.calibrate import CalibrationPlan, calibrate
from vllm_llmd.sim.pod import Outcome as SimOutcome
from vllm_llmd.sim.pod import PodConfig
from vllm_llmd.sim.profile import LatencyProfile, save_profile
from vllm_llmd.sim.router import RouterSettings
from vllm_llmd.sim.run import RunResult, SimConfig
from vllm_llmd.sim.workloads import SimRequest

# the closed-loop workloads send no SLO headers; in the simulator, SLOs that never bind (every
# policy routes such a request as it would one without SLOs) and goodput that counts all
NO_SLO = (3600.0, 3600.0)
# vLLM's defaults for an OpenAI server on CPU (engine/arg_utils.py), which the pods run with
CPU_MAX_BATCHED_TOKENS = 2048
CPU_MAX_NUM_SEQS = 128


@dataclass(frozen=True)
class Figures:
    """What one (rate, policy) run gave."""

    mean_ttft_s: float
    p90_ttft_s: float
    goodput_rps: float


def figures(ttfts: list[float], good: int, duration_s: float) -> Figures:
    ttfts = ttfts or [0.0]
    return Figures(statistics.mean(ttfts), percentile(ttfts, 90), good / duration_s)


def measured(outcomes: list[Outcome], duration_s: float) -> Figures:
    ttfts = [o.ttft_s for o in outcomes if o.ttft_s is not None]
    return figures(ttfts, sum(o.ok for o in outcomes), duration_s)


# simulated seconds between the warm-up's last arrival and the measured run's first: the real
# run starts once every warm-up answer is back
WARMUP_DRAIN_S = 2.0


def warm_then_measured(
    warm: list[tuple[float, list[int]]],
    requests: list[tuple[float, list[int]]],
    warmup_s: float,
    block_size: int,
    output_tokens: int,
) -> list[SimRequest]:
    """The warm-up's requests, then the measured ones after it: ids 0.. are the warm-up's,
    the measured run's follow in order (`measured_only` takes them back out)."""
    shift = warmup_s + WARMUP_DRAIN_S if warm else 0.0
    moved = [(at_s + shift, prompt) for at_s, prompt in requests]
    return as_sim_requests(warm + moved, block_size, output_tokens)


def measured_only(outcomes: list[SimOutcome], num_warm: int) -> list[SimOutcome]:
    """The measured run's outcomes, under the ids it had alone (arrival times stay shifted)."""
    return [
        dataclasses.replace(o, request_id=o.request_id - num_warm)
        for o in outcomes
        if o.request_id >= num_warm
    ]


def simulated(result: RunResult, config: SimConfig, duration_s: float) -> Figures:
    slo = config.goodput_slo
    assert slo.ttft_s is not None and slo.tpot_s is not None
    good = sum(1 for o in result.outcomes if o.ttft_s <= slo.ttft_s and o.tpot_s <= slo.tpot_s)
    return figures([o.ttft_s for o in result.outcomes], good, duration_s)


def slo_ratios(policy: Figures, base: Figures) -> dict[str, float]:
    """A policy's figures against the baseline's (mean TTFT: baseline / policy; goodput:
    policy / baseline, when the baseline had any): higher is better for both."""
    ratios = {"mean TTFT": base.mean_ttft_s / policy.mean_ttft_s}
    if base.goodput_rps:
        ratios["goodput"] = policy.goodput_rps / base.goodput_rps
    return ratios


def compare_slo(pods, model, tokenizer, config: SimConfig, slo, args) -> None:
    """bench_slo's open-loop workload at each rate, real then simulated, `--rounds` times (the
    policies in turns, ABBA; the same arrivals for every policy of a round and rate)."""
    pod = pods[0][0]
    policies = args.policy_list
    rates = [float(r) for r in args.rates.split(",")]
    rounds: list[dict[tuple[float, str], tuple[Figures, Figures]]] = []
    print(
        f"\n{'round rate':>10} {'policy':12} {'TTFT mean':>21} {'TTFT p90':>21} {'goodput/s':>17}"
        f"\n{'':23}{'real':>10} {'sim':>10} {'real':>10} {'sim':>10} {'real':>8} {'sim':>8}"
    )
    for round_ in range(args.rounds):
        results: dict[tuple[float, str], tuple[Figures, Figures]] = {}
        for run, rate in enumerate(rates):
            for policy in policies if round_ % 2 == 0 else policies[::-1]:
                # the rate's arrivals, texts of their own per run: the pods keep what earlier
                # runs computed
                k = policies.index(policy)
                texts = 1 + ((round_ * len(rates) + run) * len(policies) + k) * 10
                arrivals = 1 + run * 10 + round_ * 1000
                requests = make_requests(tokenizer, rate, args.duration, arrivals, args, texts)
                # unmeasured load first, prefixes of its own (as bench_slo warms each router):
                # a pod's first long prompts pay one-time costs, and the slo policy's models
                # learn; the simulator replays it too, so its router starts from the same state
                warm = []
                if args.warmup > 0:
                    warm = make_requests(tokenizer, rate, args.warmup, 5000, args, 5000 + texts)
                router = ours(policy, pods, model, args.router_flags.split())
                try:
                    if warm:
                        asyncio.run(run_load(router.url, pod.model_name, warm, args, slo))
                    outcomes = asyncio.run(
                        run_load(router.url, pod.model_name, requests, args, slo)
                    )
                finally:
                    router.stop()
                sim_result = simulate_policy(
                    warm_then_measured(
                        warm, requests, args.warmup, config.pod.block_size, args.output_tokens
                    ),
                    policy,
                    config,
                )
                sim_result = dataclasses.replace(
                    sim_result, outcomes=measured_only(sim_result.outcomes, len(warm))
                )
                results[rate, policy] = r, s = (
                    measured(outcomes, args.duration),
                    simulated(sim_result, config, args.duration),
                )
                dump_requests(
                    LOG_DIR / f"requests-r{round_ + 1}-{rate:g}-{policy}.jsonl",
                    requests,
                    outcomes,
                    sim_result,
                )
                print(
                    f"{round_ + 1:<5} {rate:4g} {policy:12} {r.mean_ttft_s * 1000:8.0f} ms"
                    f" {s.mean_ttft_s * 1000:7.0f} ms {r.p90_ttft_s * 1000:7.0f} ms"
                    f" {s.p90_ttft_s * 1000:7.0f} ms"
                    f" {r.goodput_rps:8.2f} {s.goodput_rps:8.2f}",
                    flush=True,
                )
        rounds.append(results)
    print(f"\nratios to {args.baseline} (mean TTFT: baseline / policy, higher is better;")
    print("goodput: policy / baseline), median over the rounds, measured and simulated; each")
    print("round's measured ratio after it:")
    for rate in rates:
        for policy in policies:
            if policy == args.baseline:
                continue
            real = [slo_ratios(r[rate, policy][0], r[rate, args.baseline][0]) for r in rounds]
            sim = [slo_ratios(r[rate, policy][1], r[rate, args.baseline][1]) for r in rounds]
            print_median_ratios(f"{rate:g}/s {policy}", real, sim)


def dispatch_s(pods, model, args) -> float:
    """The seconds our router adds to an idle request (bench_router's `added_latency`: the
    median through it minus straight to a pod), which the simulator spends on each request
    before its pod has it (`RouterSettings.dispatch_s`)."""
    router = ours("kv_aware", pods, model, args.router_flags.split())
    try:
        added = max(0.0, added_latency(router.url, pods[0][0]))
    finally:
        router.stop()
    print(f"router: {added * 1000:.1f} ms a request", flush=True)
    return added


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("slo", "chat", "documents"), default="slo")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--rates", default="2,4", help="slo: arrival rates, requests/s")
    parser.add_argument("--duration", type=float, default=30.0, help="slo: seconds per run")
    parser.add_argument("--policies", default="round_robin,kv_aware")
    parser.add_argument("--baseline", default="round_robin")
    parser.add_argument(
        "--router-flags", default="", help="more flags for our routers (one string)"
    )
    parser.add_argument("--prefix-tokens", type=int, default=None, help="slo 1536, else 1280")
    parser.add_argument("--num-prefixes", type=int, default=None, help="slo 4, else 6")
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument(
        "--warmup", type=float, default=10.0, help="slo: unmeasured seconds of load before each run"
    )
    parser.add_argument("--users", type=int, default=8, help="chat, documents: clients")
    parser.add_argument("--turns", type=int, default=4, help="chat: turns per conversation")
    parser.add_argument("--requests", type=int, default=72, help="documents: requests in all")
    parser.add_argument(
        "--rounds", type=int, default=1, help="runs of every policy (and rate), in turns (ABBA)"
    )
    parser.add_argument(
        "--kv-cache-mib", type=int, default=24, help="chat, documents: device KV cache per pod"
    )
    parser.add_argument(
        "--host-tier-mib", type=int, default=256, help="chat, documents: host tier per pod"
    )
    parser.add_argument(
        "--host-gbps", type=float, default=5.0, help="chat, documents: host-tier load GB/s"
    )
    parser.add_argument(
        "--profile-lengths", default="128,512,1024,2048", help="calibration prompt lengths"
    )
    parser.add_argument("--profile-batches", default="1,2,4", help="calibration batch sizes")
    parser.add_argument(
        "--router-dispatch",
        action="store_true",
        help="the simulated router takes our router's measured added latency on each request, "
        "one at a time (RouterSettings.dispatch_s; docs/simulator.md compares it with real pods)",
    )
    add_whole_pod_flag(parser)
    args = parser.parse_args()
    closed_loop = args.workload != "slo"
    if args.prefix_tokens is None:
        args.prefix_tokens = 1280 if closed_loop else 1536
    if args.num_prefixes is None:
        args.num_prefixes = 6 if closed_loop else 4
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    model = cached_model(args.preset, REPO_ROOT / ".cache" / "models")
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    args.policy_list = [p for p in args.policies.split(",") if p]
    assert args.baseline in args.policy_list, "--baseline must be one of --policies"

    kv_cache_bytes = host_bytes = None
    if closed_loop:
        kv_cache_bytes, host_bytes = args.kv_cache_mib << 20, args.host_tier_mib << 20
        pods = start_pods(
            model, kv_cache_bytes, host_offload_bytes=host_bytes, whole_pod=args.whole_pod_on_core
        )
    else:
        pods = start_pods(model, whole_pod=args.whole_pod_on_core)
    try:
        pod = pods[0][0]
        slo = NO_SLO if closed_loop else calibrate_slos(pod, tokenizer, args)
        if not closed_loop:
            print(f"SLOs: TTFT {slo[0] * 1000:.0f} ms, TPOT {slo[1] * 1000:.1f} ms", flush=True)
        plan = CalibrationPlan(
            lengths=tuple(int(x) for x in args.profile_lengths.split(",")),
            batches=tuple(int(x) for x in args.profile_batches.split(",")),
            output_tokens=16,
        )
        profile: LatencyProfile = calibrate(pod.url, pod.model_name, plan, log=False)
        save_profile(profile, LOG_DIR / "profile.json")
        metrics_text = get_text(pod.url + "/metrics")
        block_size = cache_config_info(metrics_text)[0] or BLOCK
        capacity = device_blocks(metrics_text)
        print(f"profile: {profile}", flush=True)
        print(f"pods: {capacity} blocks of {block_size} tokens each", flush=True)
        host = {}
        if kv_cache_bytes and host_bytes:  # the pods' host tier, in blocks of the device's bytes
            block_bytes = kv_cache_bytes / capacity
            host = {
                "host_capacity_blocks": int(host_bytes // block_bytes),
                "host_load_s_per_block": block_bytes / (args.host_gbps * 1e9),
            }
            print(f"host tier: {host['host_capacity_blocks']} blocks", flush=True)
        config = SimConfig(
            num_pods=2,
            pod=PodConfig(
                capacity_blocks=capacity,
                block_size=block_size,
                max_num_seqs=CPU_MAX_NUM_SEQS,
                max_batched_tokens=CPU_MAX_BATCHED_TOKENS,
                **host,
            ),
            profile=profile,
            # the router as bench_slo runs it: scrapes every 0.25 s
            router=RouterSettings(
                slo=SLO(*slo),
                scrape_interval_s=0.25,
                dispatch_s=dispatch_s(pods, model, args) if args.router_dispatch else 0.0,
            ),
            goodput_slo=SLO(*slo),
        )
        if closed_loop:
            compare_closed_loop(pods, model, tokenizer, config, args)
        else:
            compare_slo(pods, model, tokenizer, config, slo, args)
    finally:
        for server, _ in pods:
            server.stop()


if __name__ == "__main__":
    main()
