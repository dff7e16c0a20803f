"""The tests' Redis: `devtools.redis_server.RedisServer`, skipped where redis-py or
redis-server is missing. conftest.py's `redis_url` (one per module) and `redis_server` (one per
test) fixtures use it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vllm_llmd.devtools.redis_server import RedisServer


def start_redis(folder: Path) -> RedisServer:
    """A ready RedisServer; skips the test where redis-py or redis-server is missing."""
    pytest.importorskip("redis")
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    return RedisServer(folder).wait_ready()
