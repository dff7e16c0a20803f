"""A private redis-server (loopback, free port, no persistence) for tests, benchmarks and the
chaos run: started, paused (SIGSTOP: every call then hangs until its timeout), killed, and
started again on the same port (empty).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from vllm_llmd.devtools.server import free_port


class RedisServer:
    """A private redis-server (loopback, free port, no RDB or AOF files) a test can pause
    (SIGSTOP: every call then hangs until its timeout) and stop."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.folder = folder
        self.process = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(self.folder)]
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def restart(self) -> RedisServer:
        """Stop, then start again on the same port, empty (no persistence), and wait."""
        self.stop()
        self.process = self._spawn()
        return self.wait_ready()

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

    def kill(self) -> None:
        """kill -9: no shutdown, no answer to anyone."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
