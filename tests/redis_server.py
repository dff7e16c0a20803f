"""A private redis-server for the tests that need a real Redis (the router's shared index, the
shared tier): loopback, a free port, no persistence; it can be paused to make every call hang.
conftest.py's `redis_url` (one per module) and `redis_server` (one per test) fixtures use it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from vllm_llmd.devtools.server import free_port


class RedisServer:
    """A private redis-server (loopback, free port, no RDB or AOF files) a test can pause
    (SIGSTOP: every call then hangs until its timeout) and stop."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(folder)]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 10) -> RedisServer:
        import redis

        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    client.ping()
                    return self
                except redis.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        finally:
            client.close()

    def pause(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.resume()
            self.process.terminate()
            self.process.wait(10)


def start_redis(folder: Path) -> RedisServer:
    """A ready RedisServer; skips the test where redis-py or redis-server is missing."""
    pytest.importorskip("redis")
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    return RedisServer(folder).wait_ready()
