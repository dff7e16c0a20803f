"""The router's command line: its access log leaves out probes and scrapes unless asked, and
`--log-level` sets the level (flags themselves: test_router_config.py; `check`:
test_router_check.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import aiohttp
import pytest
from aiohttp import web
from router_harness import RecordingPod, url_of

from vllm_llmd.router.cli import access_log_options, build_app
from vllm_llmd.router.config_parse import parse_config

POD = ["--pod", "http://127.0.0.1:1"]


async def _requests_to(mode: str) -> None:
    """Serve a router (its one pod unreachable) with --access-log mode; send it probes,
    scrapes and requests."""
    config = parse_config([*POD, "--access-log", mode, "--policy", "load"], environ={})
    runner = web.AppRunner(build_app(config), **access_log_options(config.access_log))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = url_of(runner)
    try:
        async with aiohttp.ClientSession() as session:
            for path in ("/health", "/metrics", "/v1/models", "/health?probe=1"):
                async with session.get(url + path) as response:
                    await response.read()
            async with session.post(url + "/v1/completions", json={"prompt": "x"}) as response:
                await response.read()
    finally:
        await runner.cleanup()


def _access_lines(caplog: pytest.LogCaptureFixture, mode: str) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="aiohttp.access"):
        asyncio.run(_requests_to(mode))
    return [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]


def test_access_log_modes(caplog):
    requests = _access_lines(caplog, "requests")
    assert len(requests) == 2, requests  # the model list and the completion, no probe
    assert any('"GET /v1/models ' in line for line in requests)
    assert any('"POST /v1/completions ' in line for line in requests)
    every = _access_lines(caplog, "all")
    assert len(every) == 5, every
    assert sum('"GET /health' in line for line in every) == 2
    assert any('"GET /metrics ' in line for line in every)
    assert _access_lines(caplog, "off") == []


@contextlib.contextmanager
def _pod_in_a_thread() -> Iterator[RecordingPod]:
    """A RecordingPod served from a thread of its own (a router process polls it)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    pod = asyncio.run_coroutine_threadsafe(RecordingPod().start(), loop).result(10)
    try:
        yield pod
    finally:
        asyncio.run_coroutine_threadsafe(pod.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def _get(url: str) -> None:
    with contextlib.suppress(urllib.error.HTTPError):
        urllib.request.urlopen(url, timeout=10).read()


def test_a_router_process_logs_requests_not_probes(start_router):
    with _pod_in_a_thread() as pod:
        router = start_router(["--pod", pod.url, "--policy", "load"], "router-access-log")
        for _ in range(3):
            _get(router.url + "/health")
        _get(router.url + "/metrics")
        post = urllib.request.Request(
            router.url + "/v1/completions",
            data=b'{"model": "recording-model", "prompt": "hi"}',
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(post, timeout=10).read()
        deadline = time.monotonic() + 10
        while '"POST /v1/completions' not in router.log_path.read_text():
            assert time.monotonic() < deadline, router.log_tail(20)
            time.sleep(0.1)
        router.stop()
    log = router.log_path.read_text()
    assert "aiohttp.access" in log and '"POST /v1/completions' in log
    assert '"GET /health' not in log and '"GET /metrics' not in log
    assert " DEBUG " not in log  # --log-level INFO by default


def test_log_level_debug_reaches_the_routers_loggers(start_router):
    with _pod_in_a_thread() as pod:
        router = start_router(
            ["--pod", pod.url, "--policy", "load", "--log-level", "debug"], "router-debug"
        )
        router.stop()
    assert " DEBUG " in router.log_path.read_text()
