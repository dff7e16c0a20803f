"""Summarize a router audit log (`--audit-log`): per pod, what it was sent and how it answered.

    vllm-llmd-router audit summarize AUDIT.jsonl [--plot decisions.png]

Per pod: requests it took part in and their share of all, the mean prefix hit ratio of the
requests it answered (hit_tokens / prompt_tokens, tokenized requests only), p50 and p95 TTFT
(streamed 200 answers), the answers' status counts, and its P/D share (requests where it was
the prefill or decode pod of a prefill -> decode pair). A P/D request counts for both of its
pods. `--plot` draws the decisions over time and the TTFTs per pod (needs matplotlib).

Reads format 2 (router/audit.py) and format 1 (no "v": every route named `decode_pod`, no
status or TTFT). Lines that are not JSON objects are counted and skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class PodSummary:
    """One pod's share of the audit log."""

    pod: str
    requests: int = 0
    # of those, P/D requests (as prefill or decode pod)
    pd_requests: int = 0
    prefill_requests: int = 0
    # answers this pod gave (direct or decode), by HTTP status ("?" for format 1)
    statuses: Counter[str] = field(default_factory=Counter)
    hit_ratios: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)

    @property
    def mean_hit_ratio(self) -> float | None:
        return sum(self.hit_ratios) / len(self.hit_ratios) if self.hit_ratios else None

    @property
    def pd_share(self) -> float:
        return self.pd_requests / self.requests if self.requests else 0.0


@dataclass
class Summary:
    total: int = 0
    skipped: int = 0
    pods: dict[str, PodSummary] = field(default_factory=dict)
    # (arrival ts, answering pod, kind) per record, for the plot
    decisions: list[tuple[float, str, str]] = field(default_factory=list)

    def pod(self, pod_id: str) -> PodSummary:
        return self.pods.setdefault(pod_id, PodSummary(pod_id))


def read_records(lines: Iterable[str]) -> tuple[list[dict[str, Any]], int]:
    """The audit records in `lines`, and how many lines were not records."""
    records, skipped = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            skipped += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            skipped += 1
    return records, skipped


def roles(record: dict[str, Any]) -> tuple[str | None, str | None]:
    """(the pod that answered or was to: direct or decode, the prefill pod or None)."""
    prefill = record.get("prefill_pod")
    if record.get("v", 1) >= 2 and record.get("kind") == "direct":
        return record.get("pod"), None
    return record.get("decode_pod") or record.get("pod"), prefill


def summarize(records: Iterable[dict[str, Any]], skipped: int = 0) -> Summary:
    summary = Summary(skipped=skipped)
    for record in records:
        answering, prefill = roles(record)
        if not isinstance(answering, str):
            summary.skipped += 1
            continue
        summary.total += 1
        pd = isinstance(prefill, str)
        kind = "pd" if pd else "direct"
        summary.decisions.append((float(record.get("ts") or 0.0), answering, kind))
        main = summary.pod(answering)
        main.requests += 1
        main.pd_requests += pd
        status = record.get("status")
        main.statuses[str(status) if status is not None else "?"] += 1
        prompt, hit = record.get("prompt_tokens"), record.get("hit_tokens")
        if isinstance(prompt, int) and prompt > 0 and isinstance(hit, int):
            main.hit_ratios.append(min(1.0, hit / prompt))
        ttft = record.get("ttft_s")
        if isinstance(ttft, (int, float)):
            main.ttfts.append(float(ttft))
        if pd and prefill != answering:
            assert isinstance(prefill, str)
            other = summary.pod(prefill)
            other.requests += 1
            other.pd_requests += 1
            other.prefill_requests += 1
    return summary


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100, nearest rank) of values; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def format_table(summary: Summary) -> str:
    """The per-pod table, as printed."""
    header = ("pod", "requests", "share", "hit ratio", "TTFT p50", "TTFT p95", "P/D", "statuses")
    rows = [header]
    for pod in sorted(summary.pods.values(), key=lambda p: (-p.requests, p.pod)):
        share = pod.requests / summary.total if summary.total else 0.0
        rows.append(
            (
                pod.pod,
                str(pod.requests),
                f"{share:.1%}",
                _opt(pod.mean_hit_ratio, "{:.1%}"),
                _opt(percentile(pod.ttfts, 50), "{:.3f}s"),
                _opt(percentile(pod.ttfts, 95), "{:.3f}s"),
                f"{pod.pd_share:.0%}"
                + (f" ({pod.prefill_requests} prefill)" if pod.prefill_requests else ""),
                " ".join(f"{s}:{n}" for s, n in sorted(pod.statuses.items())) or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    skipped = f", {summary.skipped} lines skipped" if summary.skipped else ""
    lines.append(f"{summary.total} requests{skipped}")
    return "\n".join(lines)


def _opt(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def plot(summary: Summary, out: Path) -> None:
    """Decisions over time (one row per pod; P/D marked) and TTFT per pod, as a PNG.

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pods = sorted(summary.pods, key=lambda p: (-summary.pods[p].requests, p))
    rows = {pod: i for i, pod in enumerate(pods)}
    start = min((ts for ts, _, _ in summary.decisions), default=0.0)
    fig, (timeline, ttft) = plt.subplots(2, 1, figsize=(10, 2 + 0.6 * len(pods) * 2))
    for kind, marker in (("direct", "o"), ("pd", "^")):
        points = [(ts - start, rows[pod]) for ts, pod, k in summary.decisions if k == kind]
        if points:
            xs, ys = zip(*points, strict=True)
            timeline.scatter(xs, ys, marker=marker, s=12, label=kind)
    timeline.set_yticks(range(len(pods)), pods)
    timeline.set_xlabel("seconds since the first request")
    timeline.set_title("routing decisions (answering pod)")
    timeline.legend(loc="upper right")
    with_ttft = [pod for pod in pods if summary.pods[pod].ttfts]
    if with_ttft:
        data = [summary.pods[pod].ttfts for pod in with_ttft]
        try:
            ttft.boxplot(data, orientation="horizontal")
        except TypeError:  # matplotlib before 3.10
            ttft.boxplot(data, vert=False)
        ttft.set_yticks(range(1, len(with_ttft) + 1), with_ttft)
    ttft.set_xlabel("TTFT (s, streamed answers)")
    ttft.set_title("time to first token per pod")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vllm-llmd-router audit summarize",
        description="Summarize a router audit log (--audit-log) per pod.",
    )
    parser.add_argument("audit_log", type=Path, help="the router's audit log (JSON lines)")
    parser.add_argument("--plot", type=Path, metavar="OUT.png", help="also draw it as a PNG")
    args = parser.parse_args(argv)
    try:
        with open(args.audit_log) as f:
            records, skipped = read_records(f)
    except OSError as exc:
        print(f"cannot read {args.audit_log}: {exc}", file=sys.stderr)
        return 1
    summary = summarize(records, skipped)
    print(format_table(summary))
    if args.plot is not None:
        try:
            plot(summary, args.plot)
        except ImportError:
            print(
                "--plot needs matplotlib, which is not installed (pip install matplotlib); "
                "the table above is the whole summary",
                file=sys.stderr,
            )
            return 2
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
