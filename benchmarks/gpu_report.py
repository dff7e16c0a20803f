"""One table of what scripts/gpu_checks.sh ran: the tests per file, then each benchmark figure
against its same-run baseline and #17's goal.

    python benchmarks/gpu_report.py TESTS_JUNIT_XML ROWS_JSONL [--title TEXT]

Exits 1 when a test failed or errored (a goal not met is reported, not an error: it is a
measurement).
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ElementTree
from collections import Counter, defaultdict
from pathlib import Path

from report_rows import Row, read_rows


def test_outcomes(junit: Path) -> dict[str, Counter[str]]:
    """Per test file: how many passed, failed, errored and were skipped."""
    per_file: dict[str, Counter[str]] = defaultdict(Counter)
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        # a module that failed to import has its name where its tests' class would be
        module = (case.get("classname") or case.get("name") or "?").split(".")
        name = "/".join(module[:-1] if module[-1][:1].isupper() else module) + ".py"
        children = {child.tag for child in case}
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if tag in children:
                outcome = {"failure": "failed", "error": "errors"}.get(tag, tag)
        per_file[name][outcome] += 1
    return per_file


def table(per_file: dict[str, Counter[str]], rows: list[Row], title: str) -> str:
    lines = [f"## {title}", "", "| check | result | goal | met |", "|---|---|---|---|"]
    for name, counts in sorted(per_file.items()):
        result = ", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "errors", "skipped"))
        ok = counts["failed"] == counts["errors"] == 0
        lines.append(f"| `{name}` | {result} | all pass | {'yes' if ok else '**NO**'} |")
    for row in rows:
        result = f"{row.gbps:.2f} GB/s = {row.ratio:.2f}x {row.baseline} ({row.baseline_gbps:.2f})"
        goal = f">= {row.goal:.2f}x" if row.goal else "-"
        met = "-" if not row.goal else ("yes" if row.ratio >= row.goal else "**NO**")
        lines.append(f"| {row.check} | {result} | {goal} | {met} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("junit", type=Path)
    parser.add_argument("rows", type=Path)
    parser.add_argument("--title", default="GPU checks")
    args = parser.parse_args()
    per_file = test_outcomes(args.junit) if args.junit.exists() else {}
    rows = read_rows(args.rows) if args.rows.exists() else []
    print(table(per_file, rows, args.title))
    if not per_file:
        print(f"\nno test results in {args.junit}")
    if not per_file or any(c["failed"] or c["errors"] for c in per_file.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
