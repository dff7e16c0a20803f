"""Kubernetes pod discovery (`vllm_llmd.router.k8s`) with the real `kubernetes` client.

No cluster runs here, so `FakeKubeAPI` (tests/fake_kube_api.py), a real HTTP server, stands in
for the Kubernetes API server. The client is pointed at it with `--k8s-api-url` (or a
kubeconfig naming it).

- ready pods join the registry with the right URL (pod IP, numbered or named port) and role
  (label); pods not running, not ready, without an IP, being deleted, of another label or
  namespace, or with an unusable role or port stay out;
- a pod that turns not ready, is deleted, loses its label or changes IP leaves;
- a 410 (events lost) makes discovery list again, which brings back what the watch missed;
- the API server down, at start or later: the router starts, known pods stay, the event loop
  never blocks, and discovery recovers when the server returns;
- bad flags and missing credentials or client are refused with a message that says what to do.

End to end (a real router process and a real vLLM pod): test_router_k8s_e2e.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from fake_kube_api import NS, FakeKubeAPI, make_pod

from vllm_llmd.devtools.server import free_port
from vllm_llmd.router.config_parse import parse_config
from vllm_llmd.router.k8s import K8sDiscovery, K8sDiscoveryError, import_kubernetes
from vllm_llmd.router.pods import PodRegistry

CLOSED_PORT = free_port()  # nothing listens here: health checks of test pods fail at once


# ---- discovery into a PodRegistry ---------------------------------------------------------------


def pod_url(ip: str, port: int = CLOSED_PORT) -> str:
    return f"http://{ip}:{port}"


@contextlib.asynccontextmanager
async def discovering(
    api: FakeKubeAPI, selector: str = "app=vllm", **options: Any
) -> AsyncIterator[tuple[PodRegistry, K8sDiscovery]]:
    """A running PodRegistry (no static pods) fed by a running K8sDiscovery against `api`."""
    options = {
        "namespace": NS,
        "port": str(CLOSED_PORT),
        "api_url": api.url,
        "watch_timeout_s": 2,
        "retry_initial_s": 0.1,
        "retry_max_s": 0.5,
        "startup_wait_s": 5,
        **options,
    }
    registry = PodRegistry((), None, poll_interval_s=0.2)
    async with aiohttp.ClientSession() as session:
        await registry.start(session)
        discovery = K8sDiscovery(selector, **options)
        await discovery.start(registry)
        try:
            yield registry, discovery
        finally:
            await discovery.stop()
            await registry.stop()


def roles(registry: PodRegistry) -> dict[str, str]:
    """{url: role} of the registry's pods."""
    return {pod_id: pod.spec.role for pod_id, pod in registry.pods.items()}


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def test_ready_pods_join_with_url_and_role(kube_api):
    role = "llm-d.ai/role"
    kube_api.put(make_pod("p", "127.0.0.11", labels={"app": "vllm", role: "prefill"}))
    kube_api.put(make_pod("d", "127.0.0.12", labels={"app": "vllm", role: "decode"}))
    kube_api.put(make_pod("b", "127.0.0.13"))  # no role label: both
    kube_api.put(make_pod("not-ready", "127.0.0.14", ready=False))
    kube_api.put(make_pod("pending", None, phase="Pending", ready=False))
    kube_api.put(make_pod("no-ip", None))
    kube_api.put(make_pod("deleting", "127.0.0.15", deleting=True))
    kube_api.put(make_pod("bad-role", "127.0.0.16", labels={"app": "vllm", role: "router"}))
    kube_api.put(make_pod("other-app", "127.0.0.17", labels={"app": "other"}))
    kube_api.put(make_pod("other-ns", "127.0.0.18", namespace="elsewhere"))

    async def run() -> None:
        async with discovering(kube_api) as (registry, _):
            # start() returns after the first list: the pods are there at once
            assert roles(registry) == {
                pod_url("127.0.0.11"): "prefill",
                pod_url("127.0.0.12"): "decode",
                pod_url("127.0.0.13"): "both",
            }
            kube_api.put(make_pod("late", "127.0.0.19", ready=False))
            kube_api.put(make_pod("late", "127.0.0.19"))  # becomes ready
            await eventually(lambda: pod_url("127.0.0.19") in registry.pods)
            assert registry.pods[pod_url("127.0.0.19")].spec.role == "both"
            assert kube_api.num_lists == 1  # the rest came by watch

    asyncio.run(run())


def test_port_by_name_and_role_label_of_choice(kube_api):
    kube_api.put(make_pod("a", "127.0.0.11", ports={"metrics": 9000, "http": 8123}))
    kube_api.put(make_pod("no-http-port", "127.0.0.12", ports={"metrics": 9000}))
    labels = {"app": "vllm", "team/role": "decode", "llm-d.ai/role": "prefill"}
    kube_api.put(make_pod("c", "127.0.0.13", labels=labels, ports={"http": 8124}))

    async def run() -> None:
        async with discovering(kube_api, port="http", role_label="team/role") as (registry, _):
            assert roles(registry) == {
                "http://127.0.0.11:8123": "both",
                "http://127.0.0.13:8124": "decode",
            }

    asyncio.run(run())


def test_pods_that_stop_serving_leave(kube_api):
    names = ("ready", "deleted", "relabelled", "moved", "terminating")
    for i, name in enumerate(names):
        kube_api.put(make_pod(name, f"127.0.0.{11 + i}"))

    async def run() -> None:
        async with discovering(kube_api) as (registry, _):
            assert len(registry.pods) == 5
            kube_api.put(make_pod("ready", "127.0.0.11", ready=False))
            kube_api.delete("deleted")
            kube_api.put(make_pod("relabelled", "127.0.0.13", labels={"app": "retired"}))
            kube_api.put(make_pod("moved", "127.0.0.24"))  # recreated with another IP
            kube_api.put(make_pod("terminating", "127.0.0.15", deleting=True))
            want = {pod_url("127.0.0.24"): "both"}
            await eventually(lambda: roles(registry) == want)
            kube_api.put(make_pod("ready", "127.0.0.11"))  # ready again
            await eventually(lambda: pod_url("127.0.0.11") in registry.pods)
            assert kube_api.num_lists == 1

    asyncio.run(run())


def test_label_selector_picks_the_pods(kube_api):
    kube_api.put(make_pod("a", "127.0.0.11", labels={"app": "vllm", "pool": "gold"}))
    kube_api.put(make_pod("b", "127.0.0.12", labels={"app": "vllm", "pool": "silver"}))
    kube_api.put(make_pod("c", "127.0.0.13", labels={"app": "vllm"}))

    def ids(registry: PodRegistry) -> set[str]:
        return {url.split(":")[1].removeprefix("//127.0.0.") for url in registry.pods}

    async def run(selector: str, expected: set[str]) -> None:
        async with discovering(kube_api, selector) as (registry, _):
            kube_api.put(make_pod("d", "127.0.0.14", labels={"app": "vllm", "pool": "gold"}))
            await eventually(lambda: ids(registry) == expected)
            await asyncio.sleep(0.3)  # and nothing else comes by watch
            assert ids(registry) == expected
            kube_api.delete("d")

    asyncio.run(run("app=vllm,pool=gold", {"11", "14"}))  # d comes by watch
    asyncio.run(run("app=vllm,pool!=gold", {"12", "13"}))
    asyncio.run(run("app=vllm,!pool", {"13"}))


def test_expired_watch_lists_again(kube_api):
    kube_api.put(make_pod("a", "127.0.0.11"))
    kube_api.put(make_pod("b", "127.0.0.12"))

    async def run() -> None:
        async with discovering(kube_api) as (registry, discovery):
            assert set(roles(registry)) == {pod_url("127.0.0.11"), pod_url("127.0.0.12")}
            # Changes whose events are lost: only a new list can see them.
            kube_api.delete("a", record=False)
            kube_api.put(make_pod("c", "127.0.0.13"), record=False)
            kube_api.expire()
            want = {pod_url("127.0.0.12"), pod_url("127.0.0.13")}
            await eventually(lambda: set(roles(registry)) == want)
            assert kube_api.num_lists == 2
            assert discovery.num_errors == 0
            kube_api.put(make_pod("d", "127.0.0.14"))  # and the new watch follows
            await eventually(lambda: pod_url("127.0.0.14") in registry.pods)

    asyncio.run(run())


async def _max_loop_stall(seconds: float) -> float:
    """The longest the event loop left a 10 ms sleep waiting, over `seconds`."""
    worst, end = 0.0, time.monotonic() + seconds
    while time.monotonic() < end:
        before = time.monotonic()
        await asyncio.sleep(0.01)
        worst = max(worst, time.monotonic() - before)
    return worst


def test_api_server_down_then_back(kube_api):
    kube_api.put(make_pod("a", "127.0.0.11"))

    async def run() -> None:
        async with discovering(kube_api) as (registry, discovery):
            assert set(roles(registry)) == {pod_url("127.0.0.11")}
            kube_api.stop()
            stall = await _max_loop_stall(1.5)
            assert discovery.num_errors >= 2  # it kept trying, backing off
            assert stall < 0.5  # the event loop never waited on the API server
            assert set(roles(registry)) == {pod_url("127.0.0.11")}  # known pods stay
            kube_api.delete("a")  # while it is down
            kube_api.put(make_pod("b", "127.0.0.12"))
            kube_api.start()
            await eventually(lambda: set(roles(registry)) == {pod_url("127.0.0.12")})

    asyncio.run(run())


def test_router_starts_while_api_server_is_down(kube_api):
    kube_api.put(make_pod("a", "127.0.0.11"))
    kube_api.stop()

    async def run() -> None:
        started = time.monotonic()
        async with discovering(kube_api, startup_wait_s=1) as (registry, discovery):
            assert time.monotonic() - started < 5
            assert not registry.pods
            kube_api.start()
            await eventually(lambda: set(roles(registry)) == {pod_url("127.0.0.11")})
            assert discovery.num_errors >= 1

    asyncio.run(run())


def test_static_pods_are_not_touched(kube_api):
    from vllm_llmd.router.config import PodSpec

    kube_api.put(make_pod("a", "127.0.0.11"))
    kube_api.put(make_pod("b", "127.0.0.12"))
    static = PodSpec(pod_url("127.0.0.11"), "prefill")  # also listed by --pod

    async def run() -> None:
        registry = PodRegistry((static,), None, poll_interval_s=0.2)
        async with aiohttp.ClientSession() as session:
            await registry.start(session)
            discovery = K8sDiscovery(
                "app=vllm", namespace=NS, port=str(CLOSED_PORT), api_url=kube_api.url
            )
            await discovery.start(registry)
            try:
                assert roles(registry) == {static.url: "prefill", pod_url("127.0.0.12"): "both"}
                kube_api.delete("a")
                kube_api.delete("b")
                await eventually(lambda: pod_url("127.0.0.12") not in registry.pods)
                assert roles(registry) == {static.url: "prefill"}
            finally:
                await discovery.stop()
                await registry.stop()

    asyncio.run(run())


def test_removed_pods_keep_their_in_flight_counts():
    """The proxy holds a pod's state across awaits to count its request: a pod removed
    meanwhile keeps the count, and one that comes back while the request runs has it."""
    from vllm_llmd.router.config import PodSpec

    spec = PodSpec(pod_url("127.0.0.11"))
    registry = PodRegistry((), None)
    assert registry.add_pod(spec) and not registry.add_pod(spec)
    with registry.sending(spec.url):  # a request runs
        assert registry.remove_pod(spec.url) and not registry.remove_pod(spec.url)
        assert spec.url not in registry.pods and not registry.candidates(("both",))
        registry.add_pod(spec)  # back while the request runs: the same count
        assert registry.loads()[spec.url].num_in_flight == 1
    assert registry.loads()[spec.url].num_in_flight == 0
    registry.remove_pod(spec.url)
    with registry.sending(spec.url):  # routed before the removal, sent after it
        pass
    registry.add_pod(spec)
    assert registry.loads()[spec.url].num_in_flight == 0


def test_kubeconfig_reaches_the_api_and_names_the_namespace(kube_api, tmp_path):
    kube_api.put(make_pod("a", "127.0.0.11"))
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": kube_api.url}}],
                "users": [{"name": "me", "user": {"token": "t0ken"}}],
                "contexts": [
                    {"name": "ctx", "context": {"cluster": "fake", "user": "me", "namespace": NS}}
                ],
                "current-context": "ctx",
            }
        )
    )

    async def run() -> None:
        options = {"api_url": None, "namespace": None, "kubeconfig": str(kubeconfig)}
        async with discovering(kube_api, **options) as (registry, discovery):
            assert discovery.namespace == NS
            assert set(roles(registry)) == {pod_url("127.0.0.11")}

    asyncio.run(run())


# ---- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give at least one --pod (or VLLM_LLMD_ROUTER_POD), or discover pods with"),
        (["--pod", "http://a:1", "--k8s-namespace", "x"], "--k8s-namespace needs --k8s-label"),
        (["--pod", "http://a:1", "--k8s-port", "http"], "--k8s-port needs --k8s-label-selector"),
        (["--k8s-label-selector", " "], "--k8s-label-selector is empty: it would pick every pod"),
        (["--k8s-label-selector", "a=b", "--k8s-port", "0"], "--k8s-port 0: not in 1..65535"),
        (["--k8s-label-selector", "a=b", "--k8s-port", "Http_Port"], "give a port number or"),
        (["--k8s-label-selector", "a=b", "--k8s-kubeconfig", "/nope"], "/nope: no such file"),
        (["--k8s-label-selector", "a=b", "--k8s-api-url", "localhost:1"], "must start with"),
        (["--k8s-label-selector", "a=b", "--k8s-role-label", ""], "--k8s-role-label is empty"),
    ],
    ids=[
        "no-pods",
        "namespace-alone",
        "port-alone",
        "empty-selector",
        "port-zero",
        "port-name",
        "no-kubeconfig",
        "api-url",
        "role-label",
    ],
)
def test_bad_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(argv, environ={})
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_both_kubeconfig_and_api_url_are_refused(tmp_path, capsys):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("{}")
    argv = ["--k8s-label-selector", "a=b", "--k8s-kubeconfig", str(kubeconfig)]
    with pytest.raises(SystemExit):
        parse_config([*argv, "--k8s-api-url", "http://127.0.0.1:1"], environ={})
    assert "give --k8s-kubeconfig or --k8s-api-url, not both" in capsys.readouterr().err


def test_k8s_flags_alone_and_from_the_environment():
    config = parse_config(["--k8s-port", "http"], {"VLLM_LLMD_ROUTER_K8S_LABEL_SELECTOR": "a=b"})
    assert config.pods == ()
    assert (config.k8s_label_selector, config.k8s_port) == ("a=b", "http")
    assert (config.k8s_namespace, config.k8s_role_label) == (None, "llm-d.ai/role")


def test_outside_a_cluster_without_kubeconfig_is_refused(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(K8sDiscoveryError, match=r"not inside a Kubernetes pod .* --k8s-kubeconfig"):
        K8sDiscovery("app=vllm")
    # and the router says so and exits, before it serves
    argv = [sys.executable, "-m", "vllm_llmd.router.cli", "--k8s-label-selector", "app=vllm"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "error: not inside a Kubernetes pod" in done.stderr


def test_missing_client_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "kubernetes", None)  # as if it were not installed
    with pytest.raises(K8sDiscoveryError, match=r"pip install 'vllm-llmd\[k8s\]'"):
        import_kubernetes()
