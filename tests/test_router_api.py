"""vllm-llmd-router's API surface against a real router process and a real vLLM pod (the shared
`router-pod-a`): malformed, unauthorised and oversized requests get OpenAI-style errors from the
router itself; a pod's own error passes through with its status and body; /v1/models works;
and a router whose block hashes cannot match the pod's says so at start-up and routes by load."""

from __future__ import annotations

import http.client
import json
import time

import pytest
from conftest import LOG_DIR, RouterProcess, router_pod_config

from vllm_llmd.devtools.client import metric_sum, scrape_metrics

pytestmark = pytest.mark.server

KEY = "s3cret"
REQUESTS_METRIC = "llmd:router_requests_total"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def pod(vllm_servers, tiny_model):
    return vllm_servers.shared("router-pod-a", router_pod_config(tiny_model, "0"))


@pytest.fixture(scope="module")
def router(pod, tiny_model):
    """One router for the module: API key, a 1000-byte body limit, the pod's tokenizer."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    args = ["--pod", pod.url, "--tokenizer", str(tiny_model), "--api-key", KEY]
    process = RouterProcess([*args, "--max-body-bytes", "1000"], LOG_DIR / "router-api.log")
    try:
        yield process.wait_ready()
    finally:
        process.stop()


def _call(
    url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None
) -> tuple[int, dict]:
    """(status, decoded JSON body) of one request, whatever the status."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request(method, path, body, {"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _completion(model: str, **extra) -> bytes:
    return json.dumps({"model": model, "prompt": "hello there", "max_tokens": 2, **extra}).encode()


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b'{"model": "m", "prompt": ', 400, "the body is not valid JSON"),
        (b'["model", "m"]', 400, "the body must be a JSON object"),
        (b'{"prompt": "hello"}', 400, "the request has no 'model'"),
        (b'{"model": "", "prompt": "hello"}', 400, "the request has no 'model'"),
        (
            json.dumps({"model": "m", "prompt": "x" * 1000}).encode(),
            413,
            "Maximum request body size 1000 exceeded",
        ),
    ],
    ids=["bad-json", "not-an-object", "no-model", "empty-model", "too-large"],
)
def test_bad_requests_get_openai_errors(router, body, status, message):
    got, answer = _call(router.url, "POST", "/v1/completions", body, AUTH)
    assert got == status, answer
    assert message in answer["error"]["message"], answer
    assert answer["error"]["code"] == status


def test_api_key_is_required(router, pod):
    body = _completion(pod.model_name)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models")):
            status, answer = _call(
                router.url, method, path, body if method == "POST" else None, headers
            )
            assert status == 401, (headers, path, answer)
            assert answer["error"]["message"] == "missing or wrong API key"
    status, answer = _call(router.url, "POST", "/v1/completions", body, AUTH)
    assert status == 200, answer
    assert answer["usage"]["completion_tokens"] == 2


def test_pod_errors_pass_through(router, pod):
    body = _completion(pod.model_name, max_tokens=100_000)  # far above the pod's max_model_len
    direct = _call(pod.url, "POST", "/v1/completions", body)
    routed = _call(router.url, "POST", "/v1/completions", body, AUTH)
    assert direct[0] == 400
    assert routed == direct
    metrics = scrape_metrics(router.url)
    assert metric_sum(metrics, "llmd:router_requests_total", status="400") >= 1


def test_models_and_hash_verification(router, pod):
    status, answer = _call(router.url, "GET", "/v1/models", headers=AUTH)
    assert status == 200, answer
    assert [m["id"] for m in answer["data"]] == [pod.model_name]
    metrics = scrape_metrics(router.url)
    assert metric_sum(metrics, "llmd:router_hash_verification_ok", pod=pod.url) == 1


def test_wrong_block_size_is_caught_at_start_up(pod, tiny_model, start_router, tmp_path):
    audit = tmp_path / "audit.jsonl"
    args = ["--pod", pod.url, "--tokenizer", str(tiny_model), "--block-size", "256"]
    router = start_router([*args, "--audit-log", str(audit)], "router-wrong-block")
    # The first poll, before the router serves, has checked the pod.
    errors = [line for line in router.log_path.read_text().splitlines() if " ERROR " in line]
    assert len(errors) == 1, errors
    assert pod.url in errors[0]
    assert "the pod's block size is 128, the router's 256" in errors[0]
    metrics = scrape_metrics(router.url)
    assert metric_sum(metrics, "llmd:router_hash_verification_ok", pod=pod.url) == 0

    # It still serves, by load: the pod is not followed and never looked up in the index.
    status, answer = _call(router.url, "POST", "/v1/completions", _completion(pod.model_name))
    assert status == 200, answer
    time.sleep(0.5)
    status, answer = _call(router.url, "POST", "/v1/completions", _completion(pod.model_name))
    assert status == 200, answer
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(r["pod"], r["hit_tokens"]) for r in records] == [(pod.url, 0)] * 2
    metrics = scrape_metrics(router.url)
    assert metric_sum(metrics, "llmd:router_index_entries") == 0
    assert "following KV events" not in router.log_path.read_text()


def _running_while_streaming(pod, samples: int = 5) -> list[float]:
    """The pod's running-request gauge, read while a streamed request of ours runs on it.

    Measured here (vLLM 0.32, CPU): while only an unstreamed request runs, the pod's gauges do
    not move until it ends; a streamed request keeps them fresh. It counts itself (1)."""
    host, port = pod.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = _completion(pod.model_name, max_tokens=400, ignore_eos=True, stream=True)
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        seen = []
        for _ in range(samples):
            for _ in range(20):  # events: the pod took a few more steps
                response.fp.readline()
            seen.append(metric_sum(scrape_metrics(pod.url), "vllm:num_requests_running"))
        return seen
    finally:
        conn.close()


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_cancels_its_request_at_the_pod(router, pod, stream):
    """A disconnect passes through the router: the pod stops generating an answer no one will
    read (unstreamed, nothing would ever be written to notice it), the router counts it as 499
    and logs no error."""

    def metric(url: str, name: str, **labels: str) -> float:
        return metric_sum(scrape_metrics(url), name, **labels)

    def logged_errors() -> int:
        return router.log_path.read_text().count("Error handling request")

    errors_before = logged_errors()
    for _ in range(3):  # until the client left before the answer was all written
        left_before = metric(router.url, REQUESTS_METRIC, status="499")
        served_before = metric(router.url, REQUESTS_METRIC, status="200")
        decisions = metric(router.url, "llmd:router_decisions_total")
        host, port = router.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        # ~30 s of generation on this box, were it not cancelled
        body = _completion(pod.model_name, max_tokens=8000, ignore_eos=True, stream=stream)
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json", **AUTH})
        deadline = time.monotonic() + 60
        while metric(router.url, "llmd:router_decisions_total") == decisions:
            assert time.monotonic() < deadline, "the router never sent the request on"
            time.sleep(0.05)
        if stream:  # a streaming client reads a little, then leaves
            response = conn.getresponse()
            assert response.status == 200 and response.fp.readline()
            response.close()
        else:
            time.sleep(1.0)  # the pod is generating
        conn.close()
        # The router counts the request once its handler has unwound.
        deadline = time.monotonic() + 60
        while metric(router.url, REQUESTS_METRIC, status="499") == left_before:
            if metric(router.url, REQUESTS_METRIC, status="200") > served_before:
                break  # the whole answer was written before we left (a starved test process)
            assert time.monotonic() < deadline, "the router counted the request neither way"
            time.sleep(0.1)
        else:
            break
    assert metric(router.url, REQUESTS_METRIC, status="499") == left_before + 1
    # Soon only our own streamed probe runs at the pod.
    running = _running_while_streaming(pod)
    assert running[-1] <= 1, running
    assert logged_errors() == errors_before  # a client leaving is not a server error
