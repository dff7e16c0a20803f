"""The simulator beside real pods: what bench_sim_calibration's comparisons share.

Requests made for the real pods turned into the simulator's (their token ids hashed into vLLM's
block chain), one policy simulated, each request's real and simulated figures dumped side by
side, the real pods' cache size read, and the ratios printed measured beside simulated.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

from bench_slo import REPO_ROOT, Outcome

from vllm_llmd.hashing import PrefixHasher
from vllm_llmd.router.load import pod_load_from_metrics
from vllm_llmd.sim.run import RunResult, SimConfig, simulate
from vllm_llmd.sim.workloads import Chain, SimRequest

LOG_DIR = REPO_ROOT / "logs" / "bench_sim_calibration"


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


def simulate_policy(requests: list[SimRequest], policy: str, config: SimConfig) -> RunResult:
    router = dataclasses.replace(config.router, policy=policy)
    return simulate(dataclasses.replace(config, router=router), requests)


def dump_requests(
    path: Path, requests: list[tuple[float, list[int]]], outcomes: list[Outcome], sim: RunResult
) -> None:
    """One JSON line per request, real beside simulated, for looking at where the two part."""
    by_id = {o.request_id: o for o in sim.outcomes}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as out:
        for request_id, ((at_s, prompt), real) in enumerate(zip(requests, outcomes, strict=True)):
            s = by_id.get(request_id)
            row = {
                "id": request_id,
                "at_s": round(at_s, 4),
                "prompt_tokens": len(prompt),
                "real_ttft_s": real.ttft_s,
                "real_tpot_s": real.tpot_s,
                "real_pod": real.pod,
                "real_hit_tokens": real.cached_tokens,
                "sim_ttft_s": s.ttft_s if s else None,
                "sim_tpot_s": s.tpot_s if s else None,
                "sim_pod": s.pod if s else None,
                "sim_hit_tokens": s.device_hit_tokens + s.host_hit_tokens if s else None,
                "sim_host_hit_tokens": s.host_hit_tokens if s else None,
            }
            out.write(json.dumps(row) + "\n")


def device_blocks(metrics_text: str) -> int:
    """The pod's device cache in blocks (vllm:cache_config_info's num_gpu_blocks, as the
    router reads it)."""
    blocks = pod_load_from_metrics(metrics_text).kv_blocks
    if not blocks:
        raise RuntimeError("no num_gpu_blocks in the pod's vllm:cache_config_info")
    return blocks


def ratio_row(name: str, real: float, sim: float) -> str:
    gap = abs(sim / real - 1) if real else float("inf")
    verdict = "within 25%" if gap <= 0.25 else "OFF"
    return f"  {name:34} measured {real:6.2f}x  simulated {sim:6.2f}x  apart {gap:5.0%}  {verdict}"


def print_median_ratios(
    label: str, real: list[dict[str, float]], sim: list[dict[str, float]]
) -> None:
    """A row per measure every round has: the medians over the rounds of the measured and the
    simulated ratios, how far apart, then each round's measured ratio."""
    for measure in [m for m in real[0] if all(m in ratios for ratios in real + sim)]:
        real_each = [ratios[measure] for ratios in real]
        row = ratio_row(
            f"{label} {measure}",
            statistics.median(real_each),
            statistics.median(ratios[measure] for ratios in sim),
        )
        print(f"{row}  ({', '.join(f'{x:.2f}' for x in real_each)})")
