"""Fixtures that run the real thing: locally made models and real `vllm serve` processes.

- `model_path(preset)`: a model folder made by vllm_llmd.devtools.model_maker, cached under
  .cache/models/ (keyed by the preset's digest, so a changed maker makes a new one).
- `vllm_servers`: a session-wide pool. `shared(name, config)` starts a server once per session
  and hands the same one to every test that asks for that name; `launch(config)` starts a
  private one. All are stopped by PID at session end; the log tail of every server is attached
  to a failing test's report.
- `llm_engine`: an in-process `vllm.LLM` (no engine-core process: init in seconds).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import subprocess
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from redis_server import start_redis

from vllm_llmd.devtools.model_maker import cached_model
from vllm_llmd.devtools.server import (
    VLLMServer,
    VLLMServerConfig,
    free_port,
    kv_events_config,
    llmd_connector,
    wait_for_health,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_CACHE = REPO_ROOT / ".cache" / "models"
LOG_DIR = REPO_ROOT / "logs" / "tests"


def model_path(preset: str) -> Path:
    """Folder of a preset model, made on first use and cached across runs."""
    return cached_model(preset, MODEL_CACHE)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return model_path("tiny")


@pytest.fixture(scope="session")
def small_model() -> Path:
    return model_path("small")


def llmd_host_tier() -> dict[str, Any]:
    """--kv-transfer-config of a router test pod: LLMDConnector with a 64 MiB host tier."""
    return llmd_connector(extra={"host_offload_bytes": 64 << 20})


@functools.cache
def router_pod_config(model: Path, cores: str, tag: str = "") -> VLLMServerConfig:
    """A router test pod: LLMDConnector with a host tier, KV events with replay on free ports.

    Cached: every module asking for the same (model, cores, tag) gets the same config, so
    `vllm_servers.shared` hands them the same server; another tag gets its own event ports.
    """
    return VLLMServerConfig(
        model=model,
        cpu_cores=cores,
        kv_transfer_config=llmd_host_tier(),
        kv_events_config=kv_events_config(),
    )


# Shared servers that several test modules use stay up for the whole session; every other
# server stops when the module that started it ends (one vLLM holds about 2 GB of the box's 24:
# kept all session long, they would not fit).
SESSION_WIDE_SERVERS = frozenset({"router-pod-a", "router-pod-b"})


class ServerPool:
    """Every vLLM server this test session started; stops them all at the end."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.servers: list[VLLMServer] = []
        self._shared: dict[str, tuple[VLLMServerConfig, VLLMServer]] = {}

    def launch(self, config: VLLMServerConfig, name: str = "server") -> VLLMServer:
        """Start a server and wait until it serves; the caller may stop it early."""
        return self._start(config, name).wait_ready()

    def _start(self, config: VLLMServerConfig, name: str) -> VLLMServer:
        server = VLLMServer(config, self.log_dir / f"{name}-{len(self.servers)}.log")
        self.servers.append(server)
        return server.start()

    def shared(self, name: str, config: VLLMServerConfig) -> VLLMServer:
        """One server per name for the whole session (same config every time)."""
        return self.shared_group({name: config})[name]

    def shared_group(self, configs: dict[str, VLLMServerConfig]) -> dict[str, VLLMServer]:
        """Like `shared` for several servers, started together and then waited for."""
        servers = {}
        for name, config in configs.items():
            if name in self._shared:
                known, server = self._shared[name]
                wanted = dataclasses.replace(config, port=known.port)
                assert wanted == known, f"shared server {name!r} requested with another config"
                if server.is_running():
                    servers[name] = server
                    continue
            servers[name] = self._start(config, name)
            self._shared[name] = (config, servers[name])
        for server in servers.values():
            server.wait_ready()
        return servers

    def end_module(self) -> None:
        """Stop what the ending module started, except the session-wide shared servers (a
        later module asking for a stopped shared server gets it started again)."""
        keep = {id(self._shared[name][1]) for name in SESSION_WIDE_SERVERS if name in self._shared}
        for server in self.servers:
            if id(server) not in keep and server.is_running():
                server.stop()

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()


_POOL: ServerPool | None = None


@pytest.fixture(scope="session")
def vllm_servers() -> ServerPool:
    global _POOL
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    _POOL = ServerPool(LOG_DIR)
    try:
        yield _POOL
    finally:
        _POOL.stop_all()
        _POOL = None


@pytest.fixture(scope="module")
def router_pods(vllm_servers, tiny_model) -> tuple[VLLMServer, VLLMServer]:
    """The two session-wide router test pods (tiny model, one core each): a and b."""
    servers = vllm_servers.shared_group(
        {
            "router-pod-a": router_pod_config(tiny_model, "0"),
            "router-pod-b": router_pod_config(tiny_model, "1"),
        }
    )
    return servers["router-pod-a"], servers["router-pod-b"]


@pytest.fixture
def kube_api():
    """A `FakeKubeAPI` (tests/fake_kube_api.py) standing in for the Kubernetes API server."""
    from fake_kube_api import FakeKubeAPI

    api = FakeKubeAPI().start()
    try:
        yield api
    finally:
        api.close()


@pytest.fixture
def grpc_aio_poller_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drops the two errors grpc.aio's poller raises into an event loop on behalf of another
    loop (grpc/grpc#25364), for modules that use grpc.aio on more loops than one (each test's
    own, a gateway stand-in's in a thread). Its poller thread hands an operation's late
    completion (a stopped server's, a closed channel's) to the loop the operation began on:
    when that is a finished test's loop, already closed, `call_soon_threadsafe` raises
    RuntimeError; when two loops are alive, both read its wake-up socket and one finds it
    empty (BlockingIOError). Either is raised in a callback of the running test's loop, which
    anyio's runner reports as that test's failure; the completions themselves are delivered
    on the poller's next wake-up. Any other error still reaches the loop's handler."""
    report = asyncio.BaseEventLoop.call_exception_handler

    def call_exception_handler(loop: asyncio.BaseEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        noise = isinstance(error, BlockingIOError) or (
            isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        )
        if noise and "PollerCompletionQueue._handle_events" in repr(context.get("handle")):
            return
        report(loop, context)

    monkeypatch.setattr(asyncio.BaseEventLoop, "call_exception_handler", call_exception_handler)


@pytest.fixture(scope="module", autouse=True)
def _stop_module_servers():
    """Teardown of every module: its own vLLM servers stop (see SESSION_WIDE_SERVERS)."""
    yield
    if _POOL is not None:
        _POOL.end_module()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    servers = _POOL.servers if _POOL is not None else []
    used = _servers_in(item.funcargs.values()) if hasattr(item, "funcargs") else []
    # the servers this test used first, each with its warnings since start-up (a failed
    # pull's reason is often far above the last lines)
    for server in sorted(servers, key=lambda s: s not in used):
        lines = server.log_text().splitlines()
        tail = "\n".join(lines[-40:])
        serving = lines[_startup_end(lines) : -40]
        warnings = [line for line in serving if "WARNING" in line or "ERROR" in line]
        if warnings:
            tail = "\n".join(["warnings since start-up:", *warnings[-20:], "last lines:", tail])
        report.sections.append((f"vLLM server log tail: {server.log_path.name}", tail))
    for router in RouterProcess.running:
        report.sections.append((f"router log tail: {router.log_path.name}", router.log_tail(60)))


def _servers_in(values: Iterable[object]) -> list[VLLMServer]:
    """The VLLMServers among a test's fixture values (directly, or in a dict, list or tuple)."""
    found: list[VLLMServer] = []
    for value in values:
        if isinstance(value, VLLMServer):
            found.append(value)
        elif isinstance(value, dict):
            found += _servers_in(value.values())
        elif isinstance(value, list | tuple):
            found += _servers_in(value)
    return found


def _startup_end(lines: list[str]) -> int:
    """The index past uvicorn's start-up line (0 if it never started)."""
    for index, line in enumerate(lines):
        if "Application startup complete" in line:
            return index + 1
    return 0


@pytest.fixture(scope="module")
def llm_engine_factory():
    """Build in-process `vllm.LLM` engines; each is shut down at module end."""
    engines = []
    settings = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine core in this process
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; without it start-up fails on this box's NUMA size
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # never pin the pytest process to one core
    }
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)

    def make(model: Path, **kwargs):
        from vllm import LLM

        kwargs.setdefault("dtype", "float32")
        kwargs.setdefault("max_model_len", 4096)
        llm = LLM(
            model=str(model),
            distributed_executor_backend="uni",
            enforce_eager=True,
            seed=0,
            **kwargs,
        )
        engines.append(llm)
        return llm

    try:
        yield make
    finally:
        for llm in engines:
            llm.llm_engine.engine_core.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class FakeClock:
    """A monotonic clock the test moves by hand (`clock.now += seconds`)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class KeepBusy:
    """Keeps `slots` long completions in flight against `url` (a pod or a router) until the
    `with` block ends.

    Each thread runs one non-streamed request after another (a streamed one would make the
    pod's API server, which shares the pod's one core, emit every token); lengths are
    staggered by `stagger` tokens per slot, so the requests never all end at once.
    """

    def __init__(
        self,
        url: str,
        model: str,
        slots: int,
        *,
        max_tokens: int,
        stagger: int,
        seed: int,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.url, self.model, self.headers = url, model, headers
        self.max_tokens, self.stagger, self.seed = max_tokens, stagger, seed
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._keep_one, args=(i,), daemon=True) for i in range(slots)
        ]

    def _keep_one(self, slot: int) -> None:
        from vllm_llmd.devtools.client import HTTPStatusError, complete
        from vllm_llmd.devtools.model_maker import sample_text

        round_ = 0
        while not self.stop.is_set():
            prompt = sample_text(40, seed=self.seed + 100 * slot + round_)
            try:
                max_tokens = self.max_tokens + self.stagger * slot
                complete(self.url, self.model, prompt, max_tokens, self.headers)
            except (HTTPStatusError, OSError, ValueError):  # refused, shed, cut: again
                self.stop.wait(0.1)
            round_ += 1

    def __enter__(self) -> KeepBusy:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)


class RouterProcess:
    """A `vllm-llmd-router` child process on a free loopback port."""

    # routers not stopped yet: a failing test's report shows their log tails
    running: list[RouterProcess] = []

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "vllm_llmd.router.cli", "--port", str(self.port), *args]
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        RouterProcess.running.append(self)

    def log_tail(self, lines: int) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, timeout: float = 60) -> RouterProcess:
        if wait_for_health(self.url, self.process, timeout, poll_s=0.3):
            return self
        assert self.process.poll() is None, self.log_path.read_text()[-3000:]
        raise TimeoutError(f"router not ready: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self in RouterProcess.running:
            RouterProcess.running.remove(self)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def start_router():
    """start_router(args, name) -> a ready RouterProcess, stopped after the test."""
    routers = []

    def start(args: list[str], name: str = "router") -> RouterProcess:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        router = RouterProcess(args, LOG_DIR / f"{name}-{len(routers)}.log")
        routers.append(router)
        return router.wait_ready()

    yield start
    for router in routers:
        router.stop()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A private redis-server per test module."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_server(tmp_path):
    """A private redis-server per test, to pause or stop."""
    server = start_redis(tmp_path)
    try:
        yield server
    finally:
        server.stop()
