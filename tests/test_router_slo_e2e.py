"""SLO-aware routing end to end: a real router (`--policy slo`) before a real vLLM pod (tiny
model, at most two running requests so its queue is real). The latency model's predicted TTFT
converges on what clients measure; a request whose SLO no pod can meet is shed (sheddable) or
queued (critical) while one that can be met is not; a fairness id flooding the saturated pod
does not starve another (by the router's audit log)."""

from __future__ import annotations

import json
import random
import statistics
import threading
import time
import urllib.error
import urllib.request

import pytest
from conftest import KeepBusy
from router_harness import read_audit, router_args
from tokenizers import Tokenizer

from vllm_llmd.devtools.client import (
    metric_sum,
    post_json,
    scrape_metrics,
    timed_stream,
)
from vllm_llmd.devtools.model_maker import sample_text
from vllm_llmd.devtools.server import VLLMServerConfig

pytestmark = pytest.mark.server

WARMUP = 16


@pytest.fixture(scope="module")
def pod(vllm_servers, tiny_model):
    config = VLLMServerConfig(model=tiny_model, cpu_cores="1", extra_args=["--max-num-seqs", "2"])
    return vllm_servers.shared("slo-pod", config)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return Tokenizer.from_file(str(tiny_model / "tokenizer.json"))


def _prompt(tokenizer, seed: int, num_tokens: int) -> list[int]:
    """A prompt of exactly num_tokens tokens that shares no block with another seed's."""
    ids = tokenizer.encode(sample_text(num_tokens, seed=seed)).ids
    assert len(ids) >= num_tokens
    return ids[:num_tokens]


def _queue_depth(router) -> float:
    return metric_sum(scrape_metrics(router.url), "llmd:router_queue_depth")


def _slo_router(start_router, pod, tiny_model, audit, *extra: str):
    # A busy CPU pod on this box may answer /health late for seconds on end: it is not dead.
    args = router_args(
        pod.url,
        policy="slo",
        tokenizer=tiny_model,
        audit_log=audit,
        poll_interval_s=0.2,
        health_timeout_s=30,
        health_timeouts_to_evict=10,
    )
    return start_router([*args, *extra], "router-slo")


def _warm_up(router, pod, tokenizer, seed: int) -> None:
    """Teach the router's latency model: streamed requests of varied uncached length."""
    rng = random.Random(seed)
    for i in range(WARMUP):
        timed_stream(
            router.url, pod.model_name, _prompt(tokenizer, seed + i, rng.randrange(400, 4000)), 4
        )


def test_predicted_ttft_converges_on_a_real_pod(pod, tiny_model, tokenizer, start_router, tmp_path):
    audit = tmp_path / "audit.jsonl"
    router = _slo_router(start_router, pod, tiny_model, audit, "--latency-min-samples", "8")
    _warm_up(router, pod, tokenizer, seed=2000)
    rng = random.Random(1)
    errors, pairs = [], []
    for i in range(12):
        prompt = _prompt(tokenizer, 2100 + i, rng.randrange(400, 4000))
        measured = timed_stream(router.url, pod.model_name, prompt, 4).ttft_s
        record = read_audit(audit)[-1]
        assert record["predicted_ttft_s"] is not None, record
        # what the model read: the prompt's tokens, cached or not, nothing ahead when serial
        shape = record["shape"]
        assert shape["uncached_tokens"] + shape["cached_tokens"] == record["prompt_tokens"]
        assert shape["ahead_tokens"] == 0, shape
        errors.append(abs(record["predicted_ttft_s"] - measured) / measured)
        pairs.append(f"{len(prompt)}:{record['predicted_ttft_s'] * 1000:.0f}/{measured * 1000:.0f}")
    median = statistics.median(errors)
    print(f"median relative TTFT error on 12 new requests: {median:.3f}")
    print("prompt tokens:predicted/measured ms:", " ".join(pairs))
    assert median <= 0.35, pairs
    # The router exports the same judgement.
    metrics = scrape_metrics(router.url)
    counted = metric_sum(metrics, "llmd:router_ttft_prediction_relative_error_count")
    assert counted >= 12


def test_unmeetable_slo_is_shed_or_queued_by_priority(
    pod, tiny_model, tokenizer, start_router, tmp_path
):
    audit = tmp_path / "audit.jsonl"
    router = _slo_router(
        start_router,
        pod,
        tiny_model,
        audit,
        "--objective",
        "critical=10",
        "--objective",
        "batch=-1",
        "--max-waiting",
        "1",
    )
    _warm_up(router, pod, tokenizer, seed=3000)
    # A miss is served best effort only on an idle pod: wait until the pod's gauges (a step
    # behind the last warm-up answer) read idle, and the router (polling every 0.2 s) saw it.
    deadline = time.monotonic() + 30
    while metric_sum(scrape_metrics(pod.url), "vllm:num_requests_running") > 0:
        assert time.monotonic() < deadline, "the pod still runs a request after the warm-up"
        time.sleep(0.1)
    time.sleep(0.6)
    prompt = _prompt(tokenizer, 3100, 1500)

    def ask(objective: str, ttft_ms: int) -> dict:
        headers = {"x-gateway-inference-objective": objective, "x-slo-ttft-ms": str(ttft_ms)}
        body = {"model": pod.model_name, "prompt": prompt, "max_tokens": 2}
        return post_json(router.url + "/v1/completions", body, headers)

    # A miss no waiting can help (1500 tokens in 1 ms, even on an idle pod) is served at once,
    # and so is a request whose SLO can be met.
    assert ask("batch", 1)["choices"]
    assert ask("batch", 60_000)["choices"]
    # Saturate the pod through the router: six long requests against its batch of two and
    # --max-waiting 1, so at least three wait in the router (more while the pod's gauges lag,
    # which on this box they do for seconds: the router then counts each request it sent but
    # the pod does not report running as waiting there). They are long (seconds each) so the
    # router's queue never drains before the probes below, even when the starved test process
    # takes seconds to send a keeper's next request. They name an objective (unknown: priority
    # 0): plain requests are never held in the router's queue.
    standard = {"x-llm-d-inference-objective": "standard"}
    with KeepBusy(
        router.url, pod.model_name, 6, max_tokens=2000, stagger=300, seed=0, headers=standard
    ):
        deadline = time.monotonic() + 120
        while _queue_depth(router) < 1:
            assert time.monotonic() < deadline, "no request waits in the router: pod not full"
            time.sleep(0.1)
        # decisions are counted as taken (audit lines only once a request's answer is done)
        decisions = metric_sum(scrape_metrics(router.url), "llmd:router_decisions_total")
        assert decisions >= WARMUP + 2 + 1, "no long request was dispatched"
        # Sheddable traffic is refused at once, even with an easy SLO ...
        request = urllib.request.Request(
            router.url + "/v1/completions",
            json.dumps({"model": pod.model_name, "prompt": prompt, "max_tokens": 2}).encode(),
            {
                "Content-Type": "application/json",
                "x-gateway-inference-objective": "batch",
                "x-slo-ttft-ms": "60000",
            },
        )
        with pytest.raises(urllib.error.HTTPError) as shed:
            urllib.request.urlopen(request, timeout=30)
        assert shed.value.code == 429 and int(shed.value.headers["Retry-After"]) >= 1
        error = json.loads(shed.value.read())["error"]
        assert error["code"] == 429 and "within its SLO" in error["message"]
        # ... critical traffic waits in the router until the pod has room (ahead of the
        # keeper's priority-0 requests queued there), then is served.
        assert ask("critical", 60_000)["choices"]
    records = [r for r in read_audit(audit)[WARMUP:] if r["prompt_tokens"] == 1500]
    assert [(r["priority"], r["admission"]) for r in records] == [
        (-1, "met"),
        (-1, "met"),
        (10, "queued"),
    ], records
    assert records[2]["queued_s"] > 0 and records[1]["queued_s"] == 0
    metrics = scrape_metrics(router.url)
    assert metric_sum(metrics, "llmd:router_admissions_total", outcome="shed") == 1
    assert metric_sum(metrics, "llmd:router_admissions_total", outcome="queued") >= 1


def _dispatched_at(record: dict) -> float:
    """When the router dispatched a request: its arrival (`ts`) plus the time to its routing
    decision (tokenizing through the pod and the wait in the queue)."""
    return record["ts"] + record["routed_s"]


def _enqueued_at(record: dict) -> float:
    """When a request joined the router's queue: its dispatch less its wait there (`ts`
    alone is earlier by a tokenize call, which takes the pod a varying while under load)."""
    return _dispatched_at(record) - record["queued_s"]


def _flood_and_quiet(router, pod, audit) -> list[dict]:
    """24 requests of id "flood", then 4 of id "quiet" once a few floods were dispatched; the
    audit records (written as answers end), in dispatch order."""
    failures: list[Exception] = []

    def send(tenant: str, i: int) -> None:
        headers = {"x-gateway-inference-fairness-id": tenant}
        body = {"model": pod.model_name, "prompt": sample_text(40, seed=i), "max_tokens": 800}
        try:
            post_json(router.url + "/v1/completions", body, headers)
        except Exception as exc:
            failures.append(exc)

    # Long enough that the flood takes many seconds to drain: the quiet requests reach the
    # router while most of it still waits there, even on a slow, busy box.
    flood = [threading.Thread(target=send, args=("flood", 5000 + i)) for i in range(24)]
    quiet = [threading.Thread(target=send, args=("quiet", 6000 + i)) for i in range(4)]
    for thread in flood:
        thread.start()
    # The flood fills the pod and the router's queue first: the quiet id comes once a few
    # flood requests were dispatched (the rest wait in the router).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if metric_sum(scrape_metrics(router.url), "llmd:router_decisions_total") >= 3:
            break
        time.sleep(0.05)
    for thread in quiet:
        thread.start()
    for thread in flood + quiet:
        thread.join(timeout=120)
    if failures:  # e.g. a starved box evicted the pod for a moment (503): not this scenario
        print("a run whose requests failed proves nothing:", failures[:2])
        return []
    records = sorted(read_audit(audit), key=_dispatched_at)
    print("dispatch order:", " ".join("Q" if r["fairness_id"] == "quiet" else "f" for r in records))
    return records


def _contended_window(records: list[dict]) -> tuple[list[str], int] | None:
    """The ids dispatched while both ids had requests queued, and how many floods were queued
    ahead of the last quiet one; or None when the run did not set that up (a quiet request
    found the router idle, or too few floods were queued when the last quiet one arrived for
    first-come-first-served to serve them all first)."""
    quiet_records = [r for r in records if r["fairness_id"] == "quiet"]
    if not quiet_records or not all(r["admission"] == "queued" for r in quiet_records):
        return None
    all_queued = max(_enqueued_at(r) for r in quiet_records)
    last_quiet = max(_dispatched_at(r) for r in quiet_records)
    flood_waiting = [
        r
        for r in records
        if r["fairness_id"] == "flood" and _enqueued_at(r) < all_queued < _dispatched_at(r)
    ]
    if len(flood_waiting) < 7:
        return None
    window = [r["fairness_id"] for r in records if all_queued < _dispatched_at(r) <= last_quiet]
    return window, len(flood_waiting)


def test_a_flooding_fairness_id_does_not_starve_another(
    pod, tiny_model, tokenizer, start_router, tmp_path
):
    # The scenario depends on timing this box does not always give (the flood may drain
    # before the quiet id arrives): a run that did not set it up proves nothing either way,
    # and is run again (each run its own router), at most three times.
    for attempt in range(3):
        audit = tmp_path / f"audit-{attempt}.jsonl"
        router = _slo_router(start_router, pod, tiny_model, audit, "--max-waiting", "1")
        contended = _contended_window(_flood_and_quiet(router, pod, audit))
        if contended is not None:
            break
    else:
        pytest.fail("three runs in a row never queued both ids together: the test proves nothing")
    window, floods_ahead = contended
    # First come, first served would dispatch every flood queued ahead of the quiet requests
    # (at least 7) before the first quiet one, then the 4 quiet ones in a row. Fair turns
    # start the quiet id early and then give it about every other dispatch. A few floods may
    # still go first: ones the router had already taken for the pod's free slots when the
    # last quiet request joined (seen on CI: 4 of them, then strict alternation).
    first_quiet = window.index("quiet")
    served = window[first_quiet:]
    share = served.count("quiet") / len(served)
    print(
        f"{first_quiet} of {floods_ahead} queued floods went first; then quiet share {share:.2f} "
        f"({window})"
    )
    assert first_quiet < floods_ahead, window
    assert share >= 0.45, window
