"""What a simulation run measured, per policy and pod count, and the table that shows it.

- TTFT and TPOT percentiles (p50/p90/p99) over every request;
- goodput: requests per second (of simulated time) that met both SLO targets, and their share;
- prefix hit rate: prompt tokens found cached on the chosen pod (device or host tier) over all
  prompt tokens;
- load imbalance: the busiest pod's request count over the mean (1.0 is perfectly even), and
  the coefficient of variation of the counts;
- the router's latency model (policy slo): the median relative error of its TTFT predictions
  (issue #18's "error at load"), over the requests it predicted (none while its models are
  cold).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from vllm_llmd.router.slo import SLO
from vllm_llmd.sim.pod import Outcome


@dataclass(frozen=True)
class Summary:
    """One run's figures (see the module docstring)."""

    policy: str
    num_pods: int
    num_requests: int
    ttft_s: tuple[float, float, float]  # p50, p90, p99
    tpot_s: tuple[float, float, float]
    goodput_rps: float
    good_share: float
    hit_rate: float
    host_hit_rate: float
    imbalance: float
    load_cv: float
    # median |predicted - measured| / measured TTFT; None: nothing was predicted
    ttft_error_p50: float | None
    sim_s: float
    wall_s: float


def percentiles(values: Sequence[float]) -> tuple[float, float, float]:
    if not values:
        return (0.0, 0.0, 0.0)
    p50, p90, p99 = np.percentile(np.asarray(values), [50, 90, 99])
    return (float(p50), float(p90), float(p99))


def summarize(
    policy: str,
    outcomes: Sequence[Outcome],
    requests_per_pod: Sequence[int],
    slo: SLO,
    sim_s: float,
    wall_s: float,
    ttft_errors: Sequence[float] = (),
) -> Summary:
    ttfts = [o.ttft_s for o in outcomes]
    tpots = [o.tpot_s for o in outcomes]
    good = sum(1 for o in outcomes if _meets(o, slo))
    prompt = sum(o.num_prompt_tokens for o in outcomes) or 1
    counts = np.asarray(requests_per_pod, dtype=float)
    mean = float(counts.mean()) if counts.size else 0.0
    return Summary(
        policy=policy,
        num_pods=len(requests_per_pod),
        num_requests=len(outcomes),
        ttft_s=percentiles(ttfts),
        tpot_s=percentiles(tpots),
        goodput_rps=good / sim_s if sim_s > 0 else 0.0,
        good_share=good / len(outcomes) if outcomes else 0.0,
        hit_rate=sum(o.device_hit_tokens + o.host_hit_tokens for o in outcomes) / prompt,
        host_hit_rate=sum(o.host_hit_tokens for o in outcomes) / prompt,
        imbalance=float(counts.max()) / mean if mean else 0.0,
        load_cv=float(counts.std()) / mean if mean else 0.0,
        ttft_error_p50=float(np.median(ttft_errors)) if len(ttft_errors) else None,
        sim_s=sim_s,
        wall_s=wall_s,
    )


def _meets(outcome: Outcome, slo: SLO) -> bool:
    if slo.ttft_s is not None and outcome.ttft_s > slo.ttft_s:
        return False
    return slo.tpot_s is None or outcome.tpot_s <= slo.tpot_s


HEADER = (
    "| pods | policy | TTFT p50 / p90 / p99 (ms) | TPOT p50 / p90 / p99 (ms) "
    "| goodput (req/s, share) | hit rate | imbalance (max/mean, CV) | TTFT pred. error "
    "| wall (s) |"
)


def table(summaries: Iterable[Summary]) -> str:
    """A Markdown table, one row per run."""
    rows = [HEADER, "|" + "|".join("---" for _ in range(HEADER.count("|") - 1)) + "|"]
    for s in summaries:
        ttft = " / ".join(f"{v * 1000:.0f}" for v in s.ttft_s)
        tpot = " / ".join(f"{v * 1000:.1f}" for v in s.tpot_s)
        hit = f"{s.hit_rate:.1%}" + (f" ({s.host_hit_rate:.1%} host)" if s.host_hit_rate else "")
        error = "-" if s.ttft_error_p50 is None else f"{s.ttft_error_p50:.0%}"
        rows.append(
            f"| {s.num_pods} | {s.policy} | {ttft} | {tpot} "
            f"| {s.goodput_rps:.1f}, {s.good_share:.1%} | {hit} "
            f"| {s.imbalance:.2f}, {s.load_cv:.2f} | {error} | {s.wall_s:.1f} |"
        )
    return "\n".join(rows)
