"""Kubernetes pod discovery end to end: a real router process with only k8s flags before a real
vLLM pod (tiny model), the API server played by `FakeKubeAPI` (tests/fake_kube_api.py).
Requests reach the discovered pod, its KV events fill the index, and once the pod is deleted
from the API the router answers 503 and its index entries are gone; when it is back, so is the
pod.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable

import pytest
from conftest import router_pod_config
from fake_kube_api import NS, make_pod
from router_harness import wait_for

from vllm_llmd.devtools.client import metric_sum, scrape_metrics

pytestmark = pytest.mark.server


def _post(url: str, body: dict) -> tuple[int, dict, dict]:
    """(status, headers, JSON answer) of a POST to the router."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        conn.request(
            "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        conn.close()


def _router_health(url: str) -> int:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status
    finally:
        conn.close()


def _wait(condition: Callable[[], bool]) -> None:
    wait_for(condition, timeout=30.0, interval=0.1)


def test_router_routes_to_discovered_pods_and_drops_deleted_ones(
    kube_api, vllm_servers, tiny_model, start_router
):
    pod = vllm_servers.shared("router-pod-a", router_pod_config(tiny_model, "0"))
    vllm_pod = make_pod("vllm-0", "127.0.0.1", ports={"http": pod.config.port})
    kube_api.put(vllm_pod)
    kube_api.put(make_pod("vllm-1", "127.0.0.1", ready=False, ports={"http": 1}))  # starting
    args = ["--k8s-label-selector", "app=vllm", "--k8s-namespace", NS]
    args += ["--k8s-api-url", kube_api.url, "--k8s-port", "http"]
    args += ["--tokenizer", str(tiny_model), "--poll-interval-s", "0.5"]
    router = start_router(args, "router-k8s")  # ready: the pod was discovered before it served

    body = {"model": pod.model_name, "prompt": "the quick brown fox " * 60, "max_tokens": 2}
    for _ in range(2):
        status, headers, answer = _post(router.url, body)
        assert status == 200, answer
        assert headers["X-Routed-To"] == pod.url
    # The router found the pod's KV events by itself and follows them.
    _wait(lambda: metric_sum(scrape_metrics(router.url), "llmd:router_index_entries") > 0)

    kube_api.delete("vllm-0")
    _wait(lambda: _router_health(router.url) == 503)
    status, _, answer = _post(router.url, body)
    assert status == 503, answer
    assert answer["error"]["message"] == "no healthy pod can serve this request"
    _wait(lambda: metric_sum(scrape_metrics(router.url), "llmd:router_index_entries") == 0)

    kube_api.put(vllm_pod)  # back (a new pod at the same address)
    _wait(lambda: _router_health(router.url) == 200)
    status, headers, answer = _post(router.url, body)
    assert status == 200, answer
    assert "discovering pods in namespace llm" in router.log_path.read_text()
