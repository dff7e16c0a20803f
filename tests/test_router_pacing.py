"""Prefill pacing (router/pacing.py): which routes wait, how the waiting ones are released,
and (server) a real router before a real vLLM pod holding the second of two long cold
prompts sent together until the first answers, and a router with pacing off holding none."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import pytest
from router_harness import read_audit, router_args
from tokenizers import Tokenizer

from vllm_llmd.devtools.client import metric_sum, post_json, scrape_metrics
from vllm_llmd.devtools.model_maker import sample_text
from vllm_llmd.devtools.server import VLLMServerConfig
from vllm_llmd.router.config_parse import parse_config
from vllm_llmd.router.latency import LatencyModels
from vllm_llmd.router.load import PodLoad
from vllm_llmd.router.pacing import MAX_JUDGED, PrefillPacer, paced, paced_pods, prefill_work
from vllm_llmd.router.routing import RoutingPolicy, decide_route
from vllm_llmd.router.scoring import PodCache, make_policy
from vllm_llmd.router.slo import SLO, RequestClass

BLOCK = 16
A, B, P = "http://a:1", "http://b:1", "http://p:1"


def _route(num_blocks: int, caches: dict, loads: dict, prefill_pods: list[str] = ()):
    how = RoutingPolicy(make_policy("kv_aware"), None, LatencyModels(8), BLOCK, 64)
    return decide_route(
        how,
        "req-1",
        num_blocks,
        num_blocks * BLOCK,
        RequestClass(SLO()),
        [A],
        list(prefill_pods),
        caches,
        loads,
    )


def test_a_long_prompt_waits_only_behind_prefill_work_at_the_pod_that_computes_it():
    idle = {A: PodLoad(), P: PodLoad()}
    busy = {A: PodLoad(num_in_flight=1, num_prefilling=1, prefill_tokens=100), P: PodLoad()}
    long_cold = _route(8, {}, busy)  # 128 uncached tokens
    assert prefill_work(long_cold) == (A, 128)
    assert paced(long_cold, busy, 200)  # 100 ahead + 128 > 200
    assert not paced(long_cold, busy, 228)  # within the budget
    assert not paced(long_cold, busy, 0)  # off
    assert not paced(_route(8, {}, idle), idle, 64)  # nothing ahead: any prompt goes
    # a short prompt (at most half the budget) is never held, however much is ahead
    assert not paced(_route(6, {}, busy), busy, 192)  # 96 uncached + 100 ahead > 192
    assert paced(_route(7, {}, busy), busy, 192)  # 112 > 96: long
    cached = _route(8, {A: PodCache(8, ("GPU",) * 8)}, busy)
    assert cached.shape.uncached_tokens == 0 and not paced(cached, busy, 1)
    # a P/D route is paced at its prefill pod, by that pod's work ahead
    pd = _route(8, {}, {A: PodLoad(), P: busy[A]}, prefill_pods=[P])
    assert pd.prefill is not None and prefill_work(pd) == (P, 128)
    assert paced(pd, {A: PodLoad(), P: busy[A]}, 200)
    assert not paced(pd, busy, 200)


def test_a_long_prompt_goes_where_no_long_work_is_ahead_rather_than_wait():
    """Pods where a long prompt would wait count as saturated for it: the decision sends it to
    a pod without long prefill work ahead (here one busier by its request count), and where
    its prefix is cached it is short and goes to its holder whatever is ahead there."""
    loads = {
        A: PodLoad(num_in_flight=1, num_prefilling=1, prefill_tokens=1300),
        B: PodLoad(num_running=3, num_in_flight=3),
    }
    assert paced_pods(loads, {}, 1300, BLOCK, 2048) == {A}
    cached = {A: PodCache(80, ("GPU",) * 80)}  # 1280 of its 1300 tokens at A
    assert paced_pods(loads, cached, 1300, BLOCK, 2048) == frozenset()
    assert paced_pods(loads, {}, 1300, BLOCK, 0) == frozenset()
    how = RoutingPolicy(make_policy("kv_aware"), None, LatencyModels(8), BLOCK, 64)
    request = (how, "req-1", 81, 1300, RequestClass(SLO()), [A, B], [], {}, loads)
    assert decide_route(*request).decode.pod == A  # by its request count alone
    route = decide_route(*request, full=paced_pods(loads, {}, 1300, BLOCK, 2048))
    assert route.decode.pod == B and not paced(route, loads, 2048)


def test_waiting_requests_go_in_order_one_routed_before_the_next_and_passers_pass():
    async def scenario() -> list[str]:
        room = {"first": False, "second": False}
        order: list[str] = []
        pacer = PrefillPacer(max_wait_s=30)

        async def request(name: str, may_go) -> None:
            await pacer.wait(may_go)
            order.append(name)

        first = asyncio.create_task(request("first", lambda: room["first"]))
        second = asyncio.create_task(request("second", lambda: room["second"]))
        await asyncio.sleep(0.05)
        assert len(pacer) == 2 and not order
        await request("passer", lambda: True)  # may go: never held behind the waiting
        assert order == ["passer"]
        room["second"] = room["first"] = True
        pacer.pump()
        pacer.pump()  # the first released is not routed yet: nothing more goes
        assert len(pacer) == 1
        await asyncio.gather(first, second)
        assert pacer.num_paced == 2 and len(pacer) == 0
        pacer.stop()
        return order

    assert asyncio.run(scenario()) == ["passer", "first", "second"]


def test_a_pump_judges_only_the_oldest_waiting_requests():
    async def scenario() -> None:
        pacer = PrefillPacer(max_wait_s=30)
        judged: list[int] = []
        room = [False]

        def may_go(i: int) -> bool:  # once there is room, the first one past the judged ones
            judged.append(i)
            return room[0] and i == MAX_JUDGED

        tasks = [
            asyncio.create_task(pacer.wait(lambda i=i: may_go(i))) for i in range(MAX_JUDGED + 1)
        ]
        await asyncio.sleep(0.01)
        judged.clear()
        room[0] = True
        pacer.pump()
        assert judged == list(range(MAX_JUDGED)) and len(pacer) == MAX_JUDGED + 1
        pacer.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert len(pacer) == 0

    asyncio.run(scenario())


def test_a_judgement_that_fails_lets_its_request_go(caplog):
    async def scenario() -> None:
        pacer = PrefillPacer(max_wait_s=30)
        calls = []

        def may_go() -> bool:
            calls.append(1)
            if len(calls) > 1:
                raise RuntimeError("a bug")
            return False

        waiting = asyncio.create_task(pacer.wait(may_go))
        await asyncio.sleep(0.01)
        pacer.pump()  # raises nowhere: the request goes
        assert await asyncio.wait_for(waiting, 2) >= 0 and len(pacer) == 0
        pacer.stop()

    asyncio.run(scenario())
    assert "judging a waiting request failed" in caplog.text


def test_a_wait_ends_at_max_wait_and_a_client_that_leaves_is_forgotten():
    async def scenario() -> None:
        pacer = PrefillPacer(max_wait_s=0.1)
        started = time.monotonic()
        waited = await pacer.wait(lambda: False)
        assert 0.1 <= waited <= time.monotonic() - started + 1e-6
        leaving = asyncio.create_task(pacer.wait(lambda: False))
        await asyncio.sleep(0.01)
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert len(pacer) == 0
        assert await pacer.wait(lambda: True) == 0.0  # not held behind anything
        pacer.stop()

    asyncio.run(scenario())


def test_the_flag_defaults_on():
    assert parse_config(["--pod", A], environ={}).prefill_pace_tokens == 2048
    off = parse_config(["--pod", A, "--prefill-pace-tokens", "0"], environ={})
    assert off.prefill_pace_tokens == 0


# ---- a real router before a real pod ---------------------------------------------------------

PROMPT_TOKENS = 1800


@pytest.fixture(scope="module")
def pod(vllm_servers, tiny_model):
    config = VLLMServerConfig(model=tiny_model, cpu_cores="1", dtype="float32")
    return vllm_servers.shared("pacing-pod", config)


def _prompts(tiny_model, seed: int) -> list[list[int]]:
    tokenizer = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    return [
        tokenizer.encode(sample_text(PROMPT_TOKENS, seed=seed + i)).ids[:PROMPT_TOKENS]
        for i in range(2)
    ]


def _send_together(router, model: str, prompts: list[list[int]]) -> list[str]:
    """The prompts sent at once (greedy, 4 tokens each): each answer's text."""
    body = {"model": model, "max_tokens": 4, "temperature": 0}

    def one(prompt: list[int]) -> str:
        answer = post_json(router.url + "/v1/completions", {**body, "prompt": prompt})
        return answer["choices"][0]["text"]

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


@pytest.mark.server
def test_a_second_long_cold_prompt_waits_for_the_first_and_answers_the_same(
    pod, tiny_model, start_router, tmp_path
):
    """Two 1800-token cold prompts sent together to a pacing router (budget 2048) on one pod:
    one goes, the other waits in the router until the first answers (its audit line says it
    was queued; the wait histogram counts it). A cached prompt behind them is never held, and
    a router with pacing off holds neither."""
    audits = {}
    for pace in (2048, 0):
        audit = tmp_path / f"audit-{pace}.jsonl"
        args = router_args(
            pod.url,
            tokenizer=tiny_model,
            audit_log=audit,
            poll_interval_s=0.2,
            prefill_pace_tokens=pace,
        )
        router = start_router(args, f"router-pace-{pace}")
        try:
            prompts = _prompts(tiny_model, seed=100 + pace)  # cold: texts of their own
            assert all(_send_together(router, pod.model_name, prompts))
            assert _send_together(router, pod.model_name, prompts[:1])  # cached now
            metrics = scrape_metrics(router.url)
            waited = metric_sum(metrics, "llmd:router_pace_wait_seconds_count")
            assert metric_sum(metrics, "llmd:router_paced_depth") == 0
        finally:
            router.stop()
        audits[pace] = (waited, [line["queued_s"] > 0 for line in read_audit(audit)])
    assert audits[2048] == (1, [False, True, False])
    assert audits[0] == (0, [False, False, False])
