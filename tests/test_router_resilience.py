"""The router keeps serving when what it routes with fails, against a real in-process router
before real HTTP pods that record what they receive (router_harness):

- a slow tokenization (a trusted request's chat template) runs off the event loop: /health and
  other requests answer meanwhile, and past --tokenize-timeout-s the request goes by load;
- a Redis index that hangs (a paused redis-server) or is down (a stopped one) costs at most
  --index-timeout-s: the request is routed by load, counted, never a 500;
- an audit log that cannot be written (a full disk, its folder removed or missing) drops its
  records, says so once, and the requests are served.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time

import aiohttp
import pytest
from router_harness import MODEL, RecordingPod, metric, running_router

from vllm_llmd.router.tokens import TokenProcessor

BLOCK = 16
FALLBACKS = "llmd:router_routing_fallbacks_total"
AUDIT_FAILURES = "llmd:router_audit_write_failures_total"
# about 5e7 loop steps: seconds of rendering on this box (measured: 1e7 in ~0.5 s)
SLOW_TEMPLATE = (
    "{% for i in range(100000) %}{% for j in range(500) %}{% if i * j == -1 %}x{% endif %}"
    "{% endfor %}{% endfor %}{{ messages[0]['content'] }}"
)
PROMPT = " ".join(f"word{i}" for i in range(200))  # many full blocks of 16 tokens


async def _post(session, url, body, path="/v1/completions") -> tuple[int, str]:
    async with session.post(url + path, data=json.dumps(body)) as response:
        return response.status, await response.text()


async def _loop_stall_s(session, url) -> float:
    """Seconds a 0.1 s sleep and a /health call took past the sleep, in this process (the
    router's event loop is this test's: anything blocking it shows here)."""
    started = time.monotonic()
    await asyncio.sleep(0.1)
    async with session.get(url + "/health") as response:
        assert response.status == 200
    return time.monotonic() - started - 0.1


def test_health_answers_while_a_slow_chat_template_renders(tiny_model):
    async def run() -> None:
        pod = await RecordingPod().start()
        tokens = TokenProcessor(tiny_model, BLOCK)
        flags = ["--pod", pod.url, "--tokenizer", str(tiny_model), "--block-size", str(BLOCK)]
        flags += ["--trust-request-chat-template", "--tokenize-timeout-s", "0.5"]
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "chat_template": SLOW_TEMPLATE,
        }
        try:
            async with running_router(flags, tokens=tokens) as (_, url):
                async with aiohttp.ClientSession() as s:
                    started = time.monotonic()
                    slow = asyncio.create_task(_post(s, url, body, "/v1/chat/completions"))
                    stalls = [await _loop_stall_s(s, url) for _ in range(3)]
                    assert max(stalls) < 0.3, f"the event loop stalled: {stalls}"
                    assert not slow.done(), "the template rendered too fast to test anything"
                    status, _ = await slow
                    took = time.monotonic() - started
                    assert status == 200
                    assert took < 2.0, f"the request waited {took:.1f} s for its tokens"
                    assert await metric(s, url, FALLBACKS, reason="tokenize_timeout") == 1
            assert pod.received[0][1] == body
        finally:
            await pod.stop()

    asyncio.run(run())


def test_a_redis_outage_routes_by_load(tiny_model, redis_server):
    from vllm_llmd.router.redis_index import RedisIndex
    from vllm_llmd.router.shared_view import RedisSharedView

    async def run() -> None:
        pod = await RecordingPod().start()
        tokens = TokenProcessor(tiny_model, BLOCK)
        index = RedisIndex(redis_server.url)
        shared = RedisSharedView(redis_server.url)
        flags = ["--pod", pod.url, "--tokenizer", str(tiny_model), "--block-size", str(BLOCK)]
        flags += ["--redis-url", redis_server.url, "--index-timeout-s", "0.5"]
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
        hashes = list(tokens.tokenize_request("/v1/completions", body).block_hashes)
        index.add(pod.url, "GPU", hashes[:4])
        try:
            async with running_router(flags, tokens=tokens, index=index, shared=shared) as (
                _,
                url,
            ):
                async with aiohttp.ClientSession() as s:
                    assert (await _post(s, url, body))[0] == 200
                    hit_tokens = "llmd:router_prefix_hit_tokens_total"
                    assert await metric(s, url, hit_tokens) == 4 * BLOCK  # Redis answered

                    redis_server.pause()  # hangs: every call waits for its socket timeout
                    started = time.monotonic()
                    request = asyncio.create_task(_post(s, url, body))
                    stall = await _loop_stall_s(s, url)
                    assert stall < 0.3, f"the event loop stalled {stall:.1f} s"
                    status, answer = await request
                    assert status == 200, answer
                    assert time.monotonic() - started < 2.0
                    assert await metric(s, url, FALLBACKS, reason="index_timeout") >= 1
                    redis_server.resume()

                    redis_server.stop()  # down: every call fails at once
                    for _ in range(2):
                        status, answer = await _post(s, url, body)
                        assert status == 200, answer
                    assert await metric(s, url, FALLBACKS, reason="index_error") >= 1
                    assert await metric(s, url, hit_tokens) == 4 * BLOCK  # by load since
            assert len(pod.received) == 4
        finally:
            await pod.stop()

    asyncio.run(run())


def _completion() -> dict:
    return {"model": MODEL, "prompt": "hello", "max_tokens": 2}


def test_an_audit_log_on_a_full_disk_drops_records_and_serves(caplog):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")

    async def run() -> None:
        pod = await RecordingPod().start()
        flags = ["--pod", pod.url, "--audit-log", "/dev/full"]  # every write: ENOSPC
        try:
            async with running_router(flags) as (_, url), aiohttp.ClientSession() as s:
                for _ in range(3):
                    status, answer = await _post(s, url, _completion())
                    assert status == 200, answer
                assert await metric(s, url, AUDIT_FAILURES) == 3
        finally:
            await pod.stop()

    with caplog.at_level(logging.ERROR, logger="vllm_llmd.router.audit"):
        asyncio.run(run())
    reports = [r for r in caplog.records if r.name == "vllm_llmd.router.audit"]
    assert len(reports) == 1, [r.getMessage() for r in reports]  # once, not per request
    assert "/dev/full cannot be written" in reports[0].getMessage()


def test_an_audit_log_whose_folder_goes_and_comes_back(tmp_path):
    folder = tmp_path / "audit"
    path = folder / "decisions.jsonl"

    async def run() -> None:
        pod = await RecordingPod().start()
        flags = ["--pod", pod.url, "--audit-log", str(path)]
        try:
            async with running_router(flags) as (_, url), aiohttp.ClientSession() as s:
                assert (await _post(s, url, _completion()))[0] == 200  # folder missing
                assert await metric(s, url, AUDIT_FAILURES) == 1
                folder.mkdir()
                assert (await _post(s, url, _completion()))[0] == 200
                assert len(path.read_text().splitlines()) == 1
                shutil.rmtree(folder)  # removed mid-run
                assert (await _post(s, url, _completion()))[0] == 200
                assert await metric(s, url, AUDIT_FAILURES) == 2
                folder.mkdir()  # back: records go where the path points again
                assert (await _post(s, url, _completion()))[0] == 200
                assert len(path.read_text().splitlines()) == 1
        finally:
            await pod.stop()

    asyncio.run(run())
