"""Start, wait for and stop a real `lmcache server` (LMCache's MP server) on this box.

A dev helper, not part of the connector (nothing in `vllm_llmd` imports it): the shared tier's
tests and `benchmarks/bench_shared_tier.py` start their servers with it, which is why it ships
in the package rather than under tests/. The settings are the ones measured to work
on CPU: `--supported-transfer-mode auto` (the default makes a CPU vLLM hang at start-up),
`--shm-name` (shared-memory transfers, else slow pickle mode), usage telemetry off. Several
servers given the same `redis_url` form one shared tier ("hosts" sharing a Redis L2).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from vllm_llmd.devtools.server import free_port


@dataclass
class LMCacheServerConfig:
    """How to run one `lmcache server`. Ports 0: free ones, kept across restarts."""

    name: str
    redis_url: str = ""  # redis://host:port[/db]: the shared L2; "" = L1 only
    port: int = 0
    http_port: int = 0
    host: str = "127.0.0.1"
    l1_size_gb: float = 0.5
    chunk_tokens: int = 256
    extra_args: tuple[str, ...] = ()


class LMCacheServer:
    """An `lmcache server` child process: start / wait_ready / stop / kill."""

    def __init__(self, config: LMCacheServerConfig, log_path: str | Path) -> None:
        self.config = config
        config.port = config.port or free_port(config.host)
        config.http_port = config.http_port or free_port(config.host)
        self.log_path = Path(log_path)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """What `shared_tier_url` (and LMCacheMPConnector's host/port) point at."""
        return f"tcp://{self.config.host}:{self.config.port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.config.host}:{self.config.http_port}"

    @property
    def shm_name(self) -> str:
        return f"llmd_{self.config.name}_{self.config.port}"

    def command(self) -> list[str]:
        c = self.config
        script = shutil.which("lmcache", path=os.path.dirname(sys.executable)) or "lmcache"
        cmd = [script, "server", "--host", c.host, "--port", str(c.port)]
        cmd += ["--http-host", c.host, "--http-port", str(c.http_port)]
        cmd += ["--l1-size-gb", str(c.l1_size_gb), "--eviction-policy", "LRU"]
        cmd += ["--chunk-size", str(c.chunk_tokens), "--supported-transfer-mode", "auto"]
        cmd += ["--shm-name", self.shm_name]
        if c.redis_url:
            redis = urlparse(c.redis_url)
            adapter = f'{{"type":"resp","host":"{redis.hostname}","port":{redis.port}}}'
            cmd += ["--l2-adapter", adapter]
        return cmd + list(c.extra_args)

    def start(self) -> LMCacheServer:
        if self.is_running():
            raise RuntimeError(f"lmcache server {self.config.name} already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, LMCACHE_DISABLE_BANNER="1", LMCACHE_TRACK_USAGE="false")
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(self.command())}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.command(),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    def wait_ready(self, timeout: float = 60.0) -> LMCacheServer:
        """Block until /healthcheck answers; RuntimeError with the log tail otherwise."""
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"lmcache server exited: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.http_url + "/healthcheck", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"lmcache server not ready after {timeout:.0f}s: {self.log_tail()}")

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL of its process group. Idempotent."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL at once: a crash, as a failure test wants it."""
        self._end(signal.SIGKILL, 0)

    def _end(self, sig: int, timeout: float) -> None:
        if self.process is None:
            return
        process, self.process = self.process, None
        try:
            process.send_signal(sig)
            process.wait(timeout=timeout or None)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()

    def cleanup(self) -> None:
        """Stop it and remove its shared-memory pool (a killed server leaves it behind)."""
        self.stop()
        (Path("/dev/shm") / f"lmcache_l1_pool_{self.shm_name}").unlink(missing_ok=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> LMCacheServer:
        return self.start().wait_ready()

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()
