"""llmd:router_slo_requests_total: answered requests with a TTFT SLO counted on time, late or
unmeasured, by priority, against a real in-process router before a recording pod that answers
after a set delay."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from router_harness import MODEL, RecordingPod, running_router


async def _ask(session: aiohttp.ClientSession, url: str, headers: dict[str, str], **body: Any):
    payload = {"model": MODEL, "prompt": "hello", "max_tokens": 2, **body}
    async with session.post(url + "/v1/completions", json=payload, headers=headers) as answer:
        await answer.read()
        assert answer.status == 200


def test_answers_are_counted_on_time_late_or_unmeasured_by_priority() -> None:
    async def run() -> dict[tuple[str, str], float]:
        pod = await RecordingPod().start()
        flags = ["--pod", pod.url, "--objective", "interactive=5"]
        interactive = {"x-llm-d-inference-objective": "interactive"}
        try:
            async with running_router(flags) as (router, url), aiohttp.ClientSession() as s:
                await _ask(s, url, {"x-slo-ttft-ms": "10000"})  # 0, on time
                pod.delay_s = 0.3
                await _ask(s, url, {**interactive, "x-slo-ttft-ms": "100"}, stream=True)  # late
                await _ask(s, url, {**interactive, "x-slo-ttft-ms": "100"})  # unmeasured
                await _ask(s, url, {**interactive, "x-slo-ttft-ms": "10000"})  # on time
                await _ask(s, url, {})  # no SLO: not counted
                counter = router.metrics.slo_requests
                return {
                    (priority, outcome): counter.labels(priority, outcome)._value.get()
                    for priority in ("0", "5")
                    for outcome in ("on_time", "late", "unmeasured")
                }
        finally:
            await pod.stop()

    counts = asyncio.run(run())
    assert {key: n for key, n in counts.items() if n} == {
        ("0", "on_time"): 1,
        ("5", "late"): 1,
        ("5", "unmeasured"): 1,
        ("5", "on_time"): 1,
    }
