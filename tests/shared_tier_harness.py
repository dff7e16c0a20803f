"""What the shared tier's test modules share: the LMCache skip mark and a pair of real
`lmcache server`s on one Redis ("two hosts"), for module-scoped fixtures."""

from __future__ import annotations

import importlib.util
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from vllm_llmd.shared_tier.lmcache_server import LMCacheServer, LMCacheServerConfig

LOG_DIR = Path(__file__).resolve().parents[1] / "logs" / "tests"
# LMCache's chunk (tokens) in every shared-tier test: the servers' default --chunk-size
CHUNK = 256

needs_lmcache = pytest.mark.skipif(
    importlib.util.find_spec("lmcache") is None,
    reason="LMCache is not installed (pip install 'vllm-llmd[lmcache]')",
)


def lmcache_pair(
    redis_url: str, name_prefix: str = "", log_prefix: str = ""
) -> Iterator[dict[str, LMCacheServer]]:
    """Servers "a" and "b" sharing redis_url, ready; stopped when the generator closes.
    Logs: logs/tests/lmcache-{log_prefix}a.log and ...b.log."""
    servers = {
        name: LMCacheServer(
            LMCacheServerConfig(f"{name_prefix}{name}{uuid.uuid4().hex[:6]}", redis_url=redis_url),
            LOG_DIR / f"lmcache-{log_prefix}{name}.log",
        ).start()
        for name in ("a", "b")
    }
    try:
        for server in servers.values():
            server.wait_ready()
        yield servers
    finally:
        for server in servers.values():
            server.cleanup()
