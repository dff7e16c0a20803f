"""Pod health as the router judges it, against a real HTTP server playing the pod: a /health
that only times out must do so several times in a row before the pod leaves the rotation (a
busy API server on a loaded host answers late yet serves), while an error status or a refused
connection takes it out at once; a good check resets the count."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web
from router_harness import serve_on_loopback, url_of

from vllm_llmd.router.config import PodSpec
from vllm_llmd.router.pods import PodRegistry

METRICS = "vllm:num_requests_waiting 0\nvllm:num_requests_running 1\nvllm:kv_cache_usage_perc 0.5\n"


class FakePodBehaviour:
    """What the pod's /health does next: answer (status) or stall past the router's timeout."""

    def __init__(self) -> None:
        self.status = 200
        self.stall_s = 0.0


async def _start_pod(behaviour: FakePodBehaviour) -> web.AppRunner:
    async def health(_: web.Request) -> web.Response:
        if behaviour.stall_s:
            await asyncio.sleep(behaviour.stall_s)
        return web.Response(status=behaviour.status)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=METRICS)

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return await serve_on_loopback(app)


def test_slow_health_checks_evict_only_after_several_in_a_row():
    async def run() -> None:
        behaviour = FakePodBehaviour()
        runner = await _start_pod(behaviour)
        url = url_of(runner)
        registry = PodRegistry((PodSpec(url),), None, health_timeout_s=0.2, slow_checks_to_evict=3)
        state = registry.state(url)
        async with aiohttp.ClientSession() as session:
            try:
                await registry.poll_once(session)
                assert state.healthy and state.load.num_running == 1

                behaviour.stall_s = 1.0
                for _ in range(2):
                    await registry.poll_once(session)
                    assert state.healthy, "one slow check took the pod out"
                # A good check in between starts the count again.
                behaviour.stall_s = 0.0
                await registry.poll_once(session)
                assert state.healthy and state.slow_checks == 0
                behaviour.stall_s = 1.0
                for _ in range(2):
                    await registry.poll_once(session)
                assert state.healthy
                await registry.poll_once(session)  # the third in a row
                assert not state.healthy and state.slow_checks == 3

                # Back in rotation at the next good check.
                behaviour.stall_s = 0.0
                await registry.poll_once(session)
                assert state.healthy

                # An error status is not slowness: out at once.
                behaviour.status = 503
                await registry.poll_once(session)
                assert not state.healthy
                behaviour.status = 200
                await registry.poll_once(session)
                assert state.healthy
            finally:
                await runner.cleanup()
            # A refused connection (the pod is gone): out at once.
            await registry.poll_once(session)
            assert not state.healthy

    asyncio.run(run())


@pytest.mark.parametrize(("timeout", "checks"), [(0.0, 3), (1.0, 0)])
def test_bad_health_settings_are_refused(timeout, checks):
    with pytest.raises(ValueError, match="health_timeout_s"):
        PodRegistry((), None, health_timeout_s=timeout, slow_checks_to_evict=checks)
