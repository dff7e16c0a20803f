"""scripts/gpu_checks.sh, the one command a lent GPU machine runs, as a dry run on the CPU:
every step it takes there runs here too (small sizes, vLLM hidden as it is absent there), and
its one table names each test file and each benchmark figure. GPU time is scarce: a broken
script must not be found there."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_checks_runs_end_to_end_on_the_cpu_without_vllm(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON_FOR_CHECKS": sys.executable}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        ["bash", "scripts/gpu_checks.sh", "--cpu"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    for name in ("test_copy_kernels", "test_ops", "test_cuda_ipc", "test_worker_byte_paths"):
        assert f"`tests/{name}.py` |" in report, name
    for figure in ("torch path, block 16", "pull by shm", "pull by socket", "offload load"):
        assert figure in report, figure
    assert "**NO**" not in report  # every test passed; the CPU run carries no GPU goals
    # the tests ran as on the GPU machine: the check that needs vLLM to hide found none
    cases = ElementTree.parse(tmp_path / "tests.xml").getroot().iter("testcase")
    hidden = [c for c in cases if c.get("name") == "test_the_harness_runs_without_vllm"]
    assert len(hidden) == 1 and hidden[0].find("skipped") is not None
