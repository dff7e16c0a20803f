"""Start, wait for and stop a real `vllm serve` process on this box.

One handle, `VLLMServer`, serves the tests, the demo and the benchmarks. It runs vLLM through
`vllm_llmd.launcher` (so the CPU build works), on a loopback port, with the CPU settings that
keep runs reproducible (see README "Running vLLM on CPU"):

- threads: one core per server unless told otherwise. Greedy output depends on the thread
  count, so servers that are compared must share it;
- KV cache size: `VLLM_CPU_KVCACHE_SPACE` silently overrides `--kv-cache-memory-bytes`, so it
  is removed from the environment whenever a byte size is asked for;
- float32 by default: in bf16 greedy output flips with where cached KV ends.

The process runs in its own session and is stopped by process group, so no engine-core or
worker child outlives it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (Linux's default)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


# Ports are picked below the ephemeral range: a server binds its port seconds after it was
# picked (vLLM's side channels once the model is loaded), and meanwhile any outgoing
# connection on the box may take a port from that range (a CI run lost a NIXL pod so).
_PICK_FROM = (20000, _ephemeral_ports()[0] - 1)
_handed_out: set[int] = set()
_pick = random.Random()  # not the tests' seeded global generator


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on host a moment ago, outside the kernel's ephemeral range,
    and not handed out before by this process."""
    low, high = _PICK_FROM
    for _ in range(200 if high - low >= 1000 else 0):
        port = _pick.randint(low, high)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # no room below: any
        sock.bind((host, 0))
        picked: int = sock.getsockname()[1]
        return picked


def llmd_connector(
    role: str = "kv_both", extra: dict[str, Any] | None = None, **config: Any
) -> dict[str, Any]:
    """A `--kv-transfer-config` selecting LLMDConnector: role, its extra config, other keys."""
    transfer: dict[str, Any] = {"kv_connector": "LLMDConnector", "kv_role": role, **config}
    if extra is not None:
        transfer["kv_connector_extra_config"] = extra
    return transfer


def kv_events_config(topic: str = "kv") -> dict[str, Any]:
    """A `--kv-events-config`: vLLM's ZMQ publisher on a free port, with a replay socket."""
    return {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "topic": topic,
        "endpoint": f"tcp://*:{free_port()}",
        "replay_endpoint": f"tcp://*:{free_port()}",
    }


def event_endpoints(config: VLLMServerConfig) -> tuple[str, str]:
    """(events, replay): where a subscriber on this host reaches a server's KV events."""
    events = config.kv_events_config or {}
    return (
        events["endpoint"].replace("*", "127.0.0.1"),
        events["replay_endpoint"].replace("*", "127.0.0.1"),
    )


def wait_for_health(
    url: str, process: subprocess.Popen[bytes], timeout: float, poll_s: float = 0.5
) -> bool:
    """Poll GET url/health until it answers 200 (True), or the process exits or time runs
    out (False: the caller tells which by `process.poll()`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(poll_s)
    return False


class ServerStartError(RuntimeError):
    """The server exited or did not become ready in time; the message has its log tail."""


def parse_cores(spec: str) -> set[int]:
    """The cores of a VLLM_CPU_OMP_THREADS_BIND value ("0", "0-3", "0,2", "0-1|2-3")."""
    cores: set[int] = set()
    for part in spec.replace("|", ",").split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"cpu_cores {spec!r}: expected cores such as 0, 0-3 or 0,2")
        cores.update(range(int(first), int(last or first) + 1))
    return cores


@dataclass
class VLLMServerConfig:
    """How to run one `vllm serve`. Defaults suit tests on a 2-core CPU box."""

    model: Path
    port: int = 0  # 0: pick a free one
    host: str = "127.0.0.1"
    dtype: str = "float32"
    # CPU cores for the server's OpenMP threads ("0", "1", "0-1") or "nobind"
    cpu_cores: str = "0"
    # Keep the whole server (API server, engine core, workers) on `cpu_cores`, not only the
    # worker's threads. vLLM's engine core and workers spin (sched_yield) for a second after
    # each step, so two servers' floating processes take from each other's cores: a busy
    # prefill pod slowed the decode pod beside it. A pod with one core of its own, as a
    # Kubernetes CPU limit gives it.
    whole_server_on_cores: bool = False
    # KV cache size in bytes; None: 1 GiB through VLLM_CPU_KVCACHE_SPACE
    kv_cache_bytes: int | None = None
    block_size: int | None = None
    max_model_len: int | None = 8192
    kv_transfer_config: dict[str, Any] | None = None
    kv_events_config: dict[str, Any] | None = None
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    served_model_name: str | None = None
    enable_prefix_caching: bool = True
    # Run under `unshare --ipc` (root, or user namespaces): the connector's host id then
    # differs from its peers' on this box, so P/D pulls cross the side channel's TCP socket as
    # between two hosts (the same-host shared memory is not offered).
    own_ipc_namespace: bool = False


class VLLMServer:
    """A `vllm serve` child process: `start()`, `wait_ready()`, `stop()`; a context manager."""

    def __init__(self, config: VLLMServerConfig, log_path: str | Path) -> None:
        self.config = config
        if config.port == 0:
            config.port = free_port(config.host)
        self.log_path = Path(log_path)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    @property
    def model_name(self) -> str:
        return self.config.served_model_name or str(self.config.model)

    def command(self) -> list[str]:
        """The argv this server runs."""
        c = self.config
        cmd = ["unshare", "--ipc"] if c.own_ipc_namespace else []
        cmd += [
            sys.executable,
            "-m",
            "vllm_llmd.launcher",
            "serve",
            str(c.model),
            "--host",
            c.host,
            "--port",
            str(c.port),
            "--dtype",
            c.dtype,
            "--enforce-eager",
            "--seed",
            "0",
        ]
        if c.served_model_name:
            cmd += ["--served-model-name", c.served_model_name]
        if c.kv_cache_bytes is not None:
            cmd += ["--kv-cache-memory-bytes", str(c.kv_cache_bytes)]
        if c.block_size is not None:
            cmd += ["--block-size", str(c.block_size)]
        if c.max_model_len is not None:
            cmd += ["--max-model-len", str(c.max_model_len)]
        if not c.enable_prefix_caching:
            cmd += ["--no-enable-prefix-caching"]
        if c.kv_transfer_config is not None:
            cmd += ["--kv-transfer-config", json.dumps(c.kv_transfer_config)]
        if c.kv_events_config is not None:
            cmd += ["--kv-events-config", json.dumps(c.kv_events_config)]
        return cmd + list(c.extra_args)

    def environment(self) -> dict[str, str]:
        """The environment this server runs with."""
        c = self.config
        env = dict(os.environ)
        env.update(
            VLLM_HOST_IP="127.0.0.1",
            VLLM_CPU_OMP_THREADS_BIND=c.cpu_cores,
            PYTHONUNBUFFERED="1",
            VLLM_NO_USAGE_STATS="1",
            VLLM_DO_NOT_TRACK="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
        )
        if c.cpu_cores == "nobind":
            env["OMP_NUM_THREADS"] = "1"
        if c.kv_cache_bytes is None:
            env["VLLM_CPU_KVCACHE_SPACE"] = "1"
        else:
            # It would silently win over --kv-cache-memory-bytes.
            env.pop("VLLM_CPU_KVCACHE_SPACE", None)
        env.update(c.env)
        return env

    def start(self) -> VLLMServer:
        """Launch the process (returns at once; see wait_ready)."""
        if self.process is not None:
            raise RuntimeError(f"server on port {self.config.port} already started")
        # a bad core spec is refused before any process starts
        cores = parse_cores(self.config.cpu_cores) if self.config.whole_server_on_cores else None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            log.write(f"$ {' '.join(self.command())}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.command(),
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        if cores is not None:
            # now, while the launcher is one thread importing: its threads and processes to
            # come inherit it
            os.sched_setaffinity(self.process.pid, cores)
        return self

    def wait_ready(self, timeout: float = 240.0) -> VLLMServer:
        """Block until GET /health answers 200; raise ServerStartError on exit or timeout."""
        assert self.process is not None, "start() first"
        if wait_for_health(self.url, self.process, timeout):
            return self
        if self.process.poll() is not None:
            raise ServerStartError(
                f"vLLM server exited with code {self.process.returncode} before it was "
                f"ready; log {self.log_path}:\n{self.log_tail()}"
            )
        self.stop()
        raise ServerStartError(
            f"vLLM server not ready after {timeout:.0f}s; log {self.log_path}:\n{self.log_tail()}"
        )

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server and every child it made. Idempotent.

        SIGTERM goes to the API server alone, which shuts its engine core down in order; after
        it exits (or after timeout), SIGKILL sweeps the process group for anything left.
        """
        if self.process is None:
            return
        process, self.process = self.process, None
        try:
            process.terminate()
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)  # start_new_session: pgid == leader pid
        except ProcessLookupError:
            pass
        process.wait()

    def kill(self) -> None:
        """kill -9 of the server and every child it made: a crash, no shutdown. Idempotent."""
        if self.process is None:
            return
        process, self.process = self.process, None
        try:
            os.killpg(process.pid, signal.SIGKILL)  # start_new_session: pgid == leader pid
        except ProcessLookupError:
            pass
        process.wait()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __enter__(self) -> VLLMServer:
        return self.start().wait_ready()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
