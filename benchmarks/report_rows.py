"""One measured figure against the baseline measured in the same run, as the GPU benchmarks
write it (`--json FILE`: one JSON line per row) and `gpu_report.py` tabulates it."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Row:
    check: str
    gbps: float
    baseline: str
    baseline_gbps: float
    goal: float | None = None  # the least ratio to the baseline the issue asks for, if any

    @property
    def ratio(self) -> float:
        return self.gbps / self.baseline_gbps

    def line(self) -> str:
        goal = f"  goal >= {self.goal:.2f}x" if self.goal else ""
        return (
            f"{self.check:40s} {self.gbps:8.2f} GB/s  {self.ratio:5.2f}x {self.baseline} "
            f"({self.baseline_gbps:.2f} GB/s){goal}"
        )


def append_rows(path: Path | None, rows: Iterable[Row], device: str) -> None:
    if path is None:
        return
    with path.open("a") as out:
        for row in rows:
            out.write(json.dumps({**asdict(row), "device": device}) + "\n")


def read_rows(path: Path) -> list[Row]:
    rows = []
    for line in path.read_text().splitlines():
        fields = json.loads(line)
        fields.pop("device", None)
        rows.append(Row(**fields))
    return rows
