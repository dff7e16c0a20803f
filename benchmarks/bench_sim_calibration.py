"""Simulator against the real thing: bench_slo's two-pod workload, measured on real vLLM pods and
simulated on a profile calibrated from the same pods, the ratios between policies side by side.

1. Two real vLLM CPU pods, as `bench_slo.py` starts them (small model, bf16, one core each,
   LLMDConnector with a host tier, KV events on).
2. `vllm_llmd.sim.calibrate` measures one of them (`vllm-llmd-sim calibrate`'s sweeps) and fits
   the latency profile the simulator uses; the pod's device cache size comes from its
   `vllm:cache_config_info`, its batch limits are vLLM's CPU serving defaults (2048 batched
   tokens, 128 sequences), its SLOs are bench_slo's (calibrated the same way).
3. For each rate in `--rates` and each policy in `--policies`: bench_slo's open-loop workload
   (Poisson arrivals, 80% on one of four 1536-token prefixes plus a short suffix, 20% short
   unique, 16 output tokens; prefixes of its own per run) sent through our router to the real
   pods, then the very same requests (token ids hashed into vLLM's block chain) through the
   simulator: the router's own policy code over two simulated pods.
4. It prints, per rate and policy, mean and p90 TTFT and goodput for both, then each policy's
   ratio to `--baseline` (round robin) measured and simulated, and how far apart they are: the
   issue's goal is within 25%.

Not modelled by the simulator, and so part of what the comparison measures: the router and the
client sharing this box's two cores with the pods, the host tier (the device caches here hold
every prefix of a run), and HTTP hops.

Usage: `.venv/bin/python benchmarks/bench_sim_calibration.py [--rates 2,4] [--duration 30]`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
from dataclasses import dataclass

from bench_slo import (
    BLOCK,
    REPO_ROOT,
    Outcome,
    make_requests,
    ours,
    percentile,
    run_load,
    start_pods,
)
from bench_slo import calibrate as calibrate_slos
from tokenizers import Tokenizer

from vllm_llmd.devtools.client import get_text
from vllm_llmd.devtools.model_maker import cached_model
from vllm_llmd.hashing import PrefixHasher
from vllm_llmd.prometheus_text import parse_prometheus_text
from vllm_llmd.router.pod_verification import cache_config_info
from vllm_llmd.router.slo import SLO
from vllm_llmd.sim.calibrate import CalibrationPlan, calibrate
from vllm_llmd.sim.pod import PodConfig
from vllm_llmd.sim.profile import LatencyProfile, save_profile
from vllm_llmd.sim.router import RouterSettings
from vllm_llmd.sim.run import SimConfig, simulate
from vllm_llmd.sim.workloads import Chain, SimRequest

LOG_DIR = REPO_ROOT / "logs" / "bench_sim_calibration"
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


def as_sim_requests(
    requests: list[tuple[float, list[int]]], block_size: int, output_tokens: int
) -> list[SimRequest]:
    """bench_slo's (send time, token ids) as the simulator's requests: the prompts' own block
    chain, so equal prefixes share hashes exactly as on the pods."""
    hasher = PrefixHasher(block_size)
    out = []
    for request_id, (at_s, prompt) in enumerate(requests):
        chain = Chain(hasher)
        chain.extend(list(prompt))
        out.append(SimRequest(request_id, at_s, len(prompt), output_tokens, chain.hashes))
    return out


def simulated(
    requests: list[SimRequest], policy: str, config: SimConfig, duration_s: float
) -> Figures:
    router = dataclasses.replace(config.router, policy=policy)
    result = simulate(dataclasses.replace(config, router=router), requests)
    slo = config.goodput_slo
    assert slo.ttft_s is not None and slo.tpot_s is not None
    good = sum(1 for o in result.outcomes if o.ttft_s <= slo.ttft_s and o.tpot_s <= slo.tpot_s)
    return figures([o.ttft_s for o in result.outcomes], good, duration_s)


def device_blocks(metrics_text: str) -> int:
    """The pod's device cache in blocks (vllm:cache_config_info's num_gpu_blocks)."""
    only = ("vllm:cache_config_info",)
    for (_, labels), _ in parse_prometheus_text(metrics_text, only=only).items():
        blocks = dict(labels).get("num_gpu_blocks", "")
        if blocks.isdigit():
            return int(blocks)
    raise RuntimeError("no num_gpu_blocks in the pod's vllm:cache_config_info")


def ratio_row(name: str, real: float, sim: float) -> str:
    gap = abs(sim / real - 1) if real else float("inf")
    verdict = "within 25%" if gap <= 0.25 else "OFF"
    return f"  {name:34} measured {real:6.2f}x  simulated {sim:6.2f}x  apart {gap:5.0%}  {verdict}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--rates", default="2,4", help="arrival rates, requests/s")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per run")
    parser.add_argument("--policies", default="round_robin,kv_aware")
    parser.add_argument("--baseline", default="round_robin")
    parser.add_argument("--prefix-tokens", type=int, default=1536)
    parser.add_argument("--num-prefixes", type=int, default=4)
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument(
        "--profile-lengths", default="128,512,1024,2048", help="calibration prompt lengths"
    )
    parser.add_argument("--profile-batches", default="1,2,4", help="calibration batch sizes")
    args = parser.parse_args()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    model = cached_model(args.preset, REPO_ROOT / ".cache" / "models")
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    policies = [p for p in args.policies.split(",") if p]
    assert args.baseline in policies, "--baseline must be one of --policies"
    rates = [float(r) for r in args.rates.split(",")]

    pods = start_pods(model)
    try:
        pod = pods[0][0]
        slo = calibrate_slos(pod, tokenizer, args)
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
        config = SimConfig(
            num_pods=2,
            pod=PodConfig(
                capacity_blocks=capacity,
                block_size=block_size,
                max_num_seqs=CPU_MAX_NUM_SEQS,
                max_batched_tokens=CPU_MAX_BATCHED_TOKENS,
            ),
            profile=profile,
            # the router as bench_slo runs it: scrapes every 0.25 s
            router=RouterSettings(slo=SLO(*slo), scrape_interval_s=0.25),
            goodput_slo=SLO(*slo),
        )
        real: dict[tuple[float, str], Figures] = {}
        sim: dict[tuple[float, str], Figures] = {}
        print(
            f"\n{'rate':>5} {'policy':12} {'TTFT mean':>21} {'TTFT p90':>21} {'goodput/s':>17}"
            f"\n{'':18}{'real':>10} {'sim':>10} {'real':>10} {'sim':>10} {'real':>8} {'sim':>8}"
        )
        for run, rate in enumerate(rates):
            for k, policy in enumerate(policies):
                # the rate's arrivals, texts of its own per run: the pods keep what earlier
                # runs computed
                texts = 1 + (run * len(policies) + k) * 10
                requests = make_requests(tokenizer, rate, args.duration, 1 + run * 10, args, texts)
                router = ours(policy, pods, model, [])
                try:
                    outcomes = asyncio.run(
                        run_load(router.url, pod.model_name, requests, args, slo)
                    )
                finally:
                    router.stop()
                real[rate, policy] = measured(outcomes, args.duration)
                sim_requests = as_sim_requests(requests, block_size, args.output_tokens)
                sim[rate, policy] = simulated(sim_requests, policy, config, args.duration)
                r, s = real[rate, policy], sim[rate, policy]
                print(
                    f"{rate:5g} {policy:12} {r.mean_ttft_s * 1000:8.0f} ms"
                    f" {s.mean_ttft_s * 1000:7.0f} ms {r.p90_ttft_s * 1000:7.0f} ms"
                    f" {s.p90_ttft_s * 1000:7.0f} ms"
                    f" {r.goodput_rps:8.2f} {s.goodput_rps:8.2f}",
                    flush=True,
                )
        print(f"\nratios to {args.baseline} (mean TTFT: baseline / policy, higher is better;")
        print("goodput: policy / baseline), measured and simulated:")
        for rate in rates:
            base_real, base_sim = real[rate, args.baseline], sim[rate, args.baseline]
            for policy in policies:
                if policy == args.baseline:
                    continue
                r, s = real[rate, policy], sim[rate, policy]
                print(
                    ratio_row(
                        f"{rate:g}/s {policy} mean TTFT",
                        base_real.mean_ttft_s / r.mean_ttft_s,
                        base_sim.mean_ttft_s / s.mean_ttft_s,
                    )
                )
                if base_real.goodput_rps and base_sim.goodput_rps:
                    print(
                        ratio_row(
                            f"{rate:g}/s {policy} goodput",
                            r.goodput_rps / base_real.goodput_rps,
                            s.goodput_rps / base_sim.goodput_rps,
                        )
                    )
    finally:
        for server, _ in pods:
            server.stop()


if __name__ == "__main__":
    main()
