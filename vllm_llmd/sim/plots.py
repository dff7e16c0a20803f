"""The sweep's figures as one PNG: TTFT CDFs per pod count, hit rate and goodput by pod count.

matplotlib is imported here only (the Agg backend: no display), so the simulator runs
without it unless a plot is asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vllm_llmd.sim.run import SweepPoint


def plot_sweep(points: Sequence[SweepPoint], path: str | Path) -> Path:
    """Top row: each pod count's TTFT CDF per policy; bottom: hit rate and goodput share
    against pod count, per policy. Returns the path written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pod_counts = sorted({p.summary.num_pods for p in points})
    policies = list(dict.fromkeys(p.summary.policy for p in points))
    columns = max(2, len(pod_counts))
    figure, axes = plt.subplots(2, columns, figsize=(4.5 * columns, 8), squeeze=False)
    for column, num_pods in enumerate(pod_counts):
        ax = axes[0][column]
        for point in points:
            if point.summary.num_pods != num_pods or not point.ttft_s:
                continue
            ttft = np.sort(np.asarray(point.ttft_s))
            ax.plot(ttft * 1000, np.linspace(0, 1, ttft.size), label=point.summary.policy)
        ax.set_xscale("log")
        ax.set(title=f"TTFT CDF, {num_pods} pods", xlabel="TTFT (ms)", ylabel="share of requests")
        ax.grid(True, alpha=0.3)
        ax.legend()
    for column in range(len(pod_counts), columns):
        axes[0][column].axis("off")
    measures = (("hit_rate", "prefix hit rate"), ("good_share", "share meeting SLOs"))
    for ax, (what, label) in zip(axes[1][:2], measures, strict=True):
        for policy in policies:
            mine = sorted(
                (p.summary for p in points if p.summary.policy == policy), key=lambda s: s.num_pods
            )
            ax.plot(
                [s.num_pods for s in mine], [getattr(s, what) for s in mine], "o-", label=policy
            )
        ax.set_xscale("log", base=2)
        ax.set(title=f"{label} by pod count", xlabel="pods", ylabel=label, ylim=(0, 1.05))
        ax.grid(True, alpha=0.3)
        ax.legend()
    for column in range(2, columns):
        axes[1][column].axis("off")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
