"""Helpers of the router tests: an in-process router before real HTTP pods that record what
they receive, and what the router tests share.

`RecordingPod` is a real aiohttp server playing a vLLM pod's HTTP surface (health, load
metrics, models, completions): it stands in for vLLM where a test is about what the router
sends and how it treats the answer, not about generation. `running_router` serves a real
`Router` (built from command-line flags, as the CLI does) on a free loopback port.
`router_args` writes a router's command line, `read_audit` reads its audit log, `wait_for`
polls a condition.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from vllm_llmd.devtools.client import metric_sum
from vllm_llmd.prometheus_text import parse_prometheus_text
from vllm_llmd.router.app import make_app
from vllm_llmd.router.config_parse import parse_config
from vllm_llmd.router.index import Index
from vllm_llmd.router.metrics import RouterMetrics
from vllm_llmd.router.pods import PodRegistry
from vllm_llmd.router.proxy import Router
from vllm_llmd.router.scoring import make_policy
from vllm_llmd.router.shared_view import SharedTierView
from vllm_llmd.router.tokens import TokenProcessor

MODEL = "recording-model"
LOAD_METRICS = (
    "vllm:num_requests_waiting 0\nvllm:num_requests_running 0\nvllm:kv_cache_usage_perc 0.1\n"
)


async def serve_on_loopback(app: web.Application) -> web.AppRunner:
    """Serve app on a free loopback port (see `url_of`); the caller cleans the runner up."""
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


def url_of(runner: web.AppRunner) -> str:
    """The URL of an app served by `serve_on_loopback`."""
    return f"http://127.0.0.1:{runner.addresses[0][1]}"


class RecordingPod:
    """A pod that records each generate request's body and answers as told."""

    def __init__(self) -> None:
        # (path, body) of every generate request, in arrival order
        self.received: list[tuple[str, dict[str, Any]]] = []
        # answered to generate requests: (status, JSON body, extra headers)
        self.status = 200
        self.answer: dict[str, Any] = {"choices": [{"text": "ok"}]}
        self.headers: dict[str, str] = {}
        # seconds each generate request waits before its answer
        self.delay_s = 0.0
        # what its /metrics serves: its load as the router polls it
        self.metrics_text = LOAD_METRICS
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> RecordingPod:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        self._runner = await serve_on_loopback(app)
        self.url = url_of(self._runner)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _health(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(text=self.metrics_text)

    async def _models(self, _: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": MODEL}]})

    async def _generate(self, request: web.Request) -> web.Response:
        self.received.append((request.path, await request.json()))
        await asyncio.sleep(self.delay_s)
        return web.json_response(self.answer, status=self.status, headers=self.headers)


@contextlib.asynccontextmanager
async def running_router(
    flags: list[str],
    *,
    tokens: TokenProcessor | None = None,
    index: Index | None = None,
    shared: SharedTierView | None = None,
) -> AsyncIterator[tuple[Router, str]]:
    """(router, its URL), serving until the block ends. With an index, every pod counts as
    hash-verified (the pods here have no /tokenize to probe)."""
    config = parse_config(flags)
    registry = PodRegistry(config.pods, None, poll_interval_s=config.poll_interval_s)
    if index is not None:
        for pod in registry.pods.values():
            pod.hashes_ok = True
    policy = make_policy(config.policy, config.scoring_config())
    router = Router(config, registry, index, tokens, policy, RouterMetrics(), shared=shared)
    runner = await serve_on_loopback(make_app(router))
    try:
        yield router, url_of(runner)
    finally:
        await runner.cleanup()


async def metric(session: aiohttp.ClientSession, url: str, name: str, **labels: str) -> float:
    """The sum of the router's samples called name with the given labels (its /metrics)."""
    async with session.get(url + "/metrics") as response:
        return metric_sum(parse_prometheus_text(await response.text()), name, **labels)


def router_args(*pods: str, **options: object) -> list[str]:
    """A router's command line: `--pod` per pod, then `--name value` per option
    (`audit_log=path` is `--audit-log path`; `no_ingest=True` is the bare switch)."""
    args = [arg for pod in pods for arg in ("--pod", pod)]
    for name, value in options.items():
        args.append("--" + name.replace("_", "-"))
        if value is not True:
            args.append(str(value))
    return args


def read_audit(path: Path) -> list[dict[str, Any]]:
    """The decisions in a router's audit log (`--audit-log`), oldest first."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> None:
    """Poll condition() every interval seconds until it holds; AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)
