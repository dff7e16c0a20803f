"""The few vLLM names the connector's worker half imports, for machines without vLLM.

The lent GPU machines have torch with CUDA and no vLLM. The worker half
(`vllm_llmd.connector.worker` and what it imports) takes only these from vLLM: the three base
classes its step metadata subclasses, the connector-stats base class (a dataclass holding a
`data` dict) and, for the metrics of the API-server process, two names it never calls in a
worker. `install()` puts modules with exactly those into `sys.modules`, and only when vLLM
itself cannot be imported: where vLLM is, nothing here is used.

To check that on a machine with vLLM, `python -m vllm_llmd.devtools.vllm_stand_in --hide-in
DIR` writes a `sitecustomize.py` into DIR that makes vLLM unimportable for every Python
process with DIR first on its PYTHONPATH (scripts/gpu_checks.sh --cpu, the harness's test).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class KVConnectorMetadata:
    """Stands in for vLLM's base of the scheduler half's per-step metadata."""


class KVConnectorWorkerMetadata:
    """Stands in for vLLM's base of what workers report to the scheduler each step."""


class KVConnectorHandshakeMetadata:
    """Stands in for vLLM's base of what a worker reports once at start-up."""


@dataclass
class KVConnectorStats:
    """Stands in for vLLM's connector-stats base: the counters a worker reports."""

    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return self.data


class KVConnectorPromMetrics:
    """Stands in for vLLM's Prometheus base (used in the API server, never in a worker)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("vLLM stand-in: Prometheus metrics need vLLM itself")


def create_metric_per_engine(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("vLLM stand-in: Prometheus metrics need vLLM itself")


_MODULES: dict[str, dict[str, Any]] = {
    "vllm.distributed.kv_transfer.kv_connector.v1.base": {
        "KVConnectorMetadata": KVConnectorMetadata,
        "KVConnectorWorkerMetadata": KVConnectorWorkerMetadata,
        "KVConnectorHandshakeMetadata": KVConnectorHandshakeMetadata,
    },
    "vllm.distributed.kv_transfer.kv_connector.v1.metrics": {
        "KVConnectorStats": KVConnectorStats,
        "KVConnectorPromMetrics": KVConnectorPromMetrics,
    },
    "vllm.v1.metrics.utils": {"create_metric_per_engine": create_metric_per_engine},
}


def vllm_importable() -> bool:
    """True where the real vLLM can be imported (not this stand-in, not hidden)."""
    if getattr(sys.modules.get("vllm"), "__stand_in__", False):
        return False
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):  # hidden by an import hook; in sys.modules, no spec
        return False


def install() -> bool:
    """Install the stand-in modules unless vLLM is importable; True if they were installed."""
    if "vllm" in sys.modules or vllm_importable():
        return False
    for name, members in _MODULES.items():
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            package = ".".join(parts[:depth])
            if package not in sys.modules:
                module = types.ModuleType(package, "vllm-llmd's stand-in for vLLM (no vLLM here)")
                module.__path__ = []  # a package: its children import
                module.__stand_in__ = True  # type: ignore[attr-defined]
                sys.modules[package] = module
                if depth > 1:
                    setattr(sys.modules[".".join(parts[: depth - 1])], parts[depth - 1], module)
        for member, value in members.items():
            setattr(sys.modules[name], member, value)
    return True


HIDE_VLLM = '''
import importlib.abc
import sys


class NoVLLM(importlib.abc.MetaPathFinder):
    """As on the lent GPU machines: vLLM is not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "vllm" or name.startswith("vllm."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden)", name=name)
        return None


sys.meta_path.insert(0, NoVLLM())
'''


def hide_vllm_in(folder: Path) -> Path:
    """Write a sitecustomize.py into folder that hides vLLM from Python processes that have
    folder first on their PYTHONPATH; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sitecustomize.py"
    path.write_text(HIDE_VLLM)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="hide vLLM from Python processes")
    parser.add_argument("--hide-in", type=Path, required=True, help="folder for sitecustomize.py")
    hide_vllm_in(parser.parse_args().hide_in)
