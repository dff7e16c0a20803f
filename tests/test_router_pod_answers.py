"""Pods that answer the router's polls badly, played by real aiohttp servers: a /metrics gauge of
+Inf or NaN, a /kv_event_sources that is not vLLM's object (a list, a string, a rank whose
config is not an object, an endpoint that is not a string). Each is a bad answer from that pod:
logged naming the pod, the pod routed by load alone (its load left as it was, its events not
followed), and the router still starts and serves.
"""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import pytest
from aiohttp import web
from router_harness import serve_on_loopback, url_of

from vllm_llmd.events.sources import BadEventSources, discover_event_endpoints
from vllm_llmd.router.cli import build_app
from vllm_llmd.router.config import PodSpec
from vllm_llmd.router.config_parse import parse_config
from vllm_llmd.router.index import InMemoryIndex
from vllm_llmd.router.ingest import EventIngestor
from vllm_llmd.router.pod_state import PodState
from vllm_llmd.router.pods import PodRegistry

GOOD_METRICS = (
    "vllm:num_requests_waiting 0\nvllm:num_requests_running 1\nvllm:kv_cache_usage_perc 0.5\n"
)


async def start_pod(metrics: str = GOOD_METRICS, sources: object = None) -> web.AppRunner:
    """A pod's /health, /metrics and /kv_event_sources, answering what it is given."""

    async def health(_: web.Request) -> web.Response:
        return web.Response()

    async def metrics_page(_: web.Request) -> web.Response:
        return web.Response(text=metrics)

    async def event_sources(_: web.Request) -> web.Response:
        return web.Response(text=json.dumps(sources), content_type="application/json")

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/kv_event_sources", event_sources)
    return await serve_on_loopback(app)


@pytest.mark.parametrize("value", ["+Inf", "-Inf", "NaN"])
def test_a_non_finite_gauge_leaves_the_load_and_the_router_starts_and_serves(value, caplog):
    async def run() -> None:
        metrics = GOOD_METRICS.replace(
            "vllm:num_requests_waiting 0", f"vllm:num_requests_waiting {value}"
        )
        pod = await start_pod(metrics)
        url = url_of(pod)
        app = build_app(parse_config(["--pod", url], environ={}))
        router = web.AppRunner(app)
        try:
            with caplog.at_level(logging.INFO, logger="vllm_llmd.router.pods"):
                await router.setup()  # the start-up hook polls the pod once
                await web.TCPSite(router, "127.0.0.1", 0).start()
            async with aiohttp.ClientSession() as session:
                async with session.get(url_of(router) + "/health") as response:
                    assert response.status == 200
                    assert (await response.json())["healthy_pods"] == [url]
            logged = [
                r.getMessage()
                for r in caplog.records
                if url in r.getMessage() and "load not refreshed" in r.getMessage()
            ]
            assert len(logged) == 1, caplog.text
            if "Inf" in value:
                assert "not a finite number" in logged[0]
        finally:
            await router.cleanup()
            await pod.cleanup()

    asyncio.run(run())


BAD_SOURCES = [
    ([{"enable_kv_cache_events": True, "endpoint": "tcp://*:5557"}], "an array"),
    ("tcp://*:5557", "a string"),
    (7, "a number"),
    ({"0": "tcp://*:5557"}, "['0'] is a string"),
    ({"0": {"enable_kv_cache_events": True, "endpoint": 5557}}, "endpoint is a number"),
    (
        {"0": {"enable_kv_cache_events": True, "endpoint": "tcp://*:1", "replay_endpoint": []}},
        "replay_endpoint is an array",
    ),
]


@pytest.mark.parametrize(("sources", "what"), BAD_SOURCES)
def test_a_malformed_kv_event_sources_is_a_bad_answer_naming_the_field(sources, what):
    async def run() -> None:
        pod = await start_pod(sources=sources)
        try:
            async with aiohttp.ClientSession() as session:
                with pytest.raises(BadEventSources, match="kv_event_sources") as err:
                    await discover_event_endpoints(session, url_of(pod))
        finally:
            await pod.cleanup()
        assert what in str(err.value)

    asyncio.run(run())


@pytest.mark.parametrize("sources", [None, {}, {"0": {"enable_kv_cache_events": False}}])
def test_a_pod_without_events_says_so(sources):
    async def run() -> None:
        pod = await start_pod(sources=sources)
        try:
            async with aiohttp.ClientSession() as session:
                assert await discover_event_endpoints(session, url_of(pod)) == (None, None)
        finally:
            await pod.cleanup()

    asyncio.run(run())


def poll_verified_pod(sources: object, caplog) -> tuple[PodState, list[logging.LogRecord]]:
    """A pod answering `sources` at /kv_event_sources, through the registry and a real
    ingestor: started (one poll) and polled once more. Hash verification needs a tokenizer and
    a vLLM to compare with; these tests are about the event sources, so the pod counts as
    verified (what verification would decide). (its state, the log records naming it)"""

    async def run() -> PodState:
        pod = await start_pod(sources=sources)
        url = url_of(pod)
        with EventIngestor(InMemoryIndex(max_entries=100)) as ingestor:
            registry = PodRegistry((PodSpec(url),), ingestor)
            state = registry.state(url)
            state.hashes_ok = True
            async with aiohttp.ClientSession() as session:
                try:
                    with caplog.at_level(logging.WARNING, logger="vllm_llmd.router.pods"):
                        await registry.start(session)
                        await registry.poll_once(session)  # a second poll: no second line
                    assert ingestor.pods() == []
                finally:
                    await registry.stop()
                    await pod.cleanup()
        return state

    state = asyncio.run(run())
    return state, [r for r in caplog.records if state.spec.url in r.getMessage()]


@pytest.mark.parametrize(
    "sources",
    [[1, 2], "events", {"0": 5}, {"0": {"enable_kv_cache_events": True, "endpoint": "tcp://*:x*"}}],
)
def test_the_registry_starts_with_a_bad_sources_pod_and_routes_it_by_load(sources, caplog):
    """The pod joins the rotation, is not followed, the problem is logged once naming it."""
    state, records = poll_verified_pod(sources, caplog)
    assert state.healthy and not state.subscribed
    warnings = [r.getMessage() for r in records]
    assert len(warnings) == 1 and "routed by load alone" in warnings[0], warnings


@pytest.mark.parametrize("sources", [{}, {"0": {"enable_kv_cache_events": False}}])
def test_a_verified_pod_with_events_off_is_an_error_naming_the_fix_once(sources, caplog):
    """Before, a pod with KV events off passed verification and was quietly routed by load
    alone: nothing said why the router never saw its cache."""
    state, records = poll_verified_pod(sources, caplog)
    assert state.healthy and not state.subscribed
    assert len(records) == 1 and records[0].levelno == logging.ERROR, caplog.text
    message = records[0].getMessage()
    assert "publishes no KV events" in message and "--kv-events-config" in message


def test_a_pod_never_reached_is_named_in_health_and_logged_once(caplog):
    """Before, a router whose pod could never be reached logged only its start line, and its
    /health said 503 naming nothing."""
    from vllm_llmd.devtools.server import free_port

    async def run() -> None:
        url = f"http://127.0.0.1:{free_port()}"  # nothing listens
        registry = PodRegistry((PodSpec(url),), None)
        with caplog.at_level(logging.WARNING, logger="vllm_llmd.router.pods"):
            async with aiohttp.ClientSession() as session:
                for _ in range(3):
                    await registry.poll_once(session)
        logged = [r.getMessage() for r in caplog.records if url in r.getMessage()]
        assert len(logged) == 1 and "is not in rotation" in logged[0], logged
        [problem] = registry.problems().values()
        assert problem["healthy"] is False and "Cannot connect" in str(problem["problem"])

        app = build_app(parse_config(["--pod", url], environ={}))
        router = web.AppRunner(app)
        try:
            await router.setup()
            await web.TCPSite(router, "127.0.0.1", 0).start()
            async with aiohttp.ClientSession() as session:
                async with session.get(url_of(router) + "/health") as response:
                    assert response.status == 503
                    body = await response.json()
            assert body["healthy_pods"] == [] and "Cannot connect" in body["pods"][url]["problem"]
        finally:
            await router.cleanup()

    asyncio.run(run())
