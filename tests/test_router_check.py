"""`vllm-llmd-router check`: one OK/WARN/FAIL line per check of each pod, a summary, and the
exit status (0 without FAIL, 1 with one, 2 on a usage error), against stub pods: aiohttp apps
with a vLLM pod's /health, /v1/models, /metrics (`vllm:cache_config_info`) and
/kv_event_sources, and a ZMQ publisher of (empty) event batches."""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import threading
import time
from collections.abc import Iterator

import msgspec
import pytest
import zmq
from aiohttp import web
from router_harness import serve_on_loopback, url_of

from vllm_llmd.devtools.server import free_port
from vllm_llmd.router.check import main as check_main
from vllm_llmd.router.cli import main as cli_main

MODEL = "stub-model"


def cache_config(block_size: int, algorithm: str = "sha256") -> str:
    return (
        f'vllm:cache_config_info{{block_size="{block_size}",'
        f'prefix_caching_hash_algo="{algorithm}",engine="0"}} 1.0\n'
    )


class StubPod:
    """A vLLM pod's HTTP surface, served from a thread of its own (check runs its own loop)."""

    def __init__(self, metrics: str, event_sources: dict | None = None) -> None:
        self.metrics = metrics
        self.event_sources = event_sources or {}
        self.url = ""

    @contextlib.contextmanager
    def running(self) -> Iterator[StubPod]:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/kv_event_sources", self._event_sources)
        runner = asyncio.run_coroutine_threadsafe(serve_on_loopback(app), loop).result(10)
        self.url = url_of(runner)
        try:
            yield self
        finally:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)

    async def _health(self, _: web.Request) -> web.Response:
        return web.Response(text="")

    async def _models(self, _: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": MODEL}]})

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(text=self.metrics)

    async def _event_sources(self, _: web.Request) -> web.Response:
        return web.json_response(self.event_sources)


@contextlib.contextmanager
def publisher(port: int) -> Iterator[None]:
    """A ZMQ PUB on port publishing an empty event batch (topic kv) every 50 ms."""
    stop = threading.Event()
    sock = zmq.Context.instance().socket(zmq.PUB)
    sock.bind(f"tcp://127.0.0.1:{port}")

    def run() -> None:
        seq = 0
        while not stop.wait(0.05):
            payload = msgspec.msgpack.encode([time.time(), [], 0])
            sock.send_multipart([b"kv", seq.to_bytes(8, "big"), payload])
            seq += 1

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        sock.close(linger=0)


def run_check(argv: list[str]) -> tuple[int, list[str]]:
    out = io.StringIO()
    status = check_main(argv, out=out)
    return status, out.getvalue().splitlines()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def test_nothing_listening_is_a_fail_naming_connection_refused():
    url = f"http://127.0.0.1:{closed_port()}"
    status, lines = run_check(["--pod", url, "--check-timeout-s", "1"])
    assert status == 1
    assert f"FAIL {url}  reachable: GET /health: connection refused" in "\n".join(lines)
    assert lines[-1].startswith("FAIL: 1 pods;") and "1 FAIL" in lines[-1]


def test_the_subcommand_runs_from_the_routers_entry_point(capsys):
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(SystemExit) as exited:
        cli_main(["check", "--pod", url, "--check-timeout-s", "1"])
    assert exited.value.code == 1
    assert "connection refused" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys):
    for argv, message in (
        ([], "give at least one --pod"),
        (["--pod", "http://127.0.0.1:1", "--check-timeout-s", "0"], "--check-timeout-s must be"),
        (["--pod", "ftp://x"], "must start with http://"),
    ):
        with pytest.raises(SystemExit) as exited:
            check_main(argv)
        assert exited.value.code == 2
        assert message in capsys.readouterr().err


def test_stub_pods_with_events_and_matching_settings_pass():
    port = free_port()
    sources = {"0": {"enable_kv_cache_events": True, "endpoint": f"tcp://*:{port}"}}
    with (
        publisher(port),
        StubPod(cache_config(16), sources).running() as first,
        StubPod(cache_config(16)).running() as second,
    ):
        status, lines = run_check(["--pod", first.url, "--pod", second.url])
    text = "\n".join(lines)
    assert status == 0, text
    assert f"OK   {first.url}  reachable: GET /health answered 200 (role both)" in text
    assert f"OK   {first.url}  model: {MODEL}" in text
    assert f"OK   {first.url}  cache config: block size 16, hash algorithm sha256" in text
    assert (
        f"OK   {first.url}  KV events: tcp://127.0.0.1:{port} (no replay endpoint): events received"
        in text
    )
    # the second pod publishes nothing: routed by load alone, a warning only
    assert f"WARN {second.url}  KV events: none configured" in text
    assert "WARN router  tokenizer: no --tokenizer" in text
    assert lines[-1] == "OK: 2 pods; 7 OK, 2 WARN, 0 FAIL"
    checks = [line.split(f"{first.url}  ")[1].split(":")[0] for line in lines if first.url in line]
    assert checks == ["reachable", "model", "cache config", "KV events"]


def test_settings_that_differ_from_the_routers_fail():
    with (
        StubPod(cache_config(16)).running() as first,
        StubPod(cache_config(32, "sha256_cbor")).running() as second,
        StubPod("vllm:num_requests_running 0\n").running() as silent,
    ):
        # the router adopts the first pod's settings: the second differs
        status, lines = run_check(["--pod", first.url, "--pod", second.url, "--pod", silent.url])
        text = "\n".join(lines)
        assert status == 1, text
        assert f"OK   {first.url}  cache config: block size 16" in text
        assert (
            f"FAIL {second.url}  cache config: block size 32, hash algorithm sha256_cbor; the "
            "router's: block size 16, hash algorithm sha256" in text
        )
        assert f"WARN {silent.url}  cache config: no vllm:cache_config_info" in text
        # given flags win over the first pod's
        status, lines = run_check(["--pod", second.url, "--block-size", "32"])
        text = "\n".join(lines)
        assert "router's: block size 32, hash algorithm sha256_cbor" not in text
        assert f"OK   {second.url}  cache config: block size 32" in text and status == 0
        status, lines = run_check(["--pod", first.url, "--block-size", "32"])
        assert status == 1 and "the router's: block size 32" in "\n".join(lines)


def test_an_events_endpoint_where_nothing_answers_fails():
    port = free_port()
    with StubPod(cache_config(16)).running() as pod:
        status, lines = run_check(
            ["--pod", f"{pod.url},events=tcp://127.0.0.1:{port}", "--check-timeout-s", "1"]
        )
    text = "\n".join(lines)
    assert status == 1, text
    assert (
        f"FAIL {pod.url}  KV events: tcp://127.0.0.1:{port} (no replay endpoint): no events" in text
    )
    assert "nothing answers" in text
