"""`FakeKubeAPI`: a real HTTP server (aiohttp, on a free loopback port) standing in for the
Kubernetes API server where no cluster runs. It serves what the router's pod discovery uses and
nothing else: `GET /api/v1/namespaces/{ns}/pods` as a list (honouring `labelSelector`: `k=v`,
`k==v`, `k!=v`, `k`, `!k`) and with `watch=true` as a stream of JSON lines (ADDED, MODIFIED,
DELETED, and an ERROR 410 when the watch's resourceVersion is too old). The `kube_api` fixture
(conftest.py) serves one per test; `make_pod` writes the pods it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from typing import Any

from aiohttp import web

from vllm_llmd.devtools.server import free_port

NS = "llm"


def make_pod(
    name: str,
    ip: str | None = "127.0.0.11",
    *,
    labels: dict[str, str] | None = None,
    ready: bool = True,
    phase: str = "Running",
    deleting: bool = False,
    ports: dict[str, int] | None = None,
    namespace: str = NS,
) -> dict[str, Any]:
    """A pod as the API server returns it (the fields discovery reads, and the required ones)."""
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "uid": f"uid-{name}",
        "labels": {"app": "vllm"} if labels is None else labels,
    }
    if deleting:
        metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    container_ports = [{"name": n, "containerPort": p} for n, p in (ports or {}).items()]
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if ip is not None:
        status["podIP"] = ip
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {"containers": [{"name": "vllm", "image": "vllm", "ports": container_ports}]},
        "status": status,
    }


def selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """Equality-based label selectors, as the API server reads them."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            ok = labels.get(key.strip()) != value.strip()
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            ok = labels.get(key.strip()) == value.strip()
        elif term.startswith("!"):
            ok = term[1:].strip() not in labels
        else:
            ok = term in labels
        if not ok:
            return False
    return True


class FakeKubeAPI:
    """The pods endpoints of a Kubernetes API server, on its own thread and event loop.

    `put`, `delete` and `expire` change its state from any thread. `record=False` changes it
    without a watch event (as if the event was compacted away); only a list sees the change.
    `stop()` takes the server down (connections refused); `start()` brings it back.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[str] = []  # "list" / "watch", in arrival order
        self._lock = threading.Lock()
        self._pods: dict[tuple[str, str], dict] = {}  # (namespace, name) -> pod
        # (resourceVersion, type, pod, the pod before) of every recorded change
        self._events: list[tuple[int, str, dict, dict | None]] = []
        self._rv = 100
        self._oldest_rv = 0  # a watch from an older resourceVersion gets 410
        self._generation = 0  # bumped by expire(): open watches end with 410
        self._changed: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    @property
    def num_lists(self) -> int:
        return self.requests.count("list")

    # ---- state, from the test's thread

    def put(self, pod: dict, record: bool = True) -> None:
        """Create or replace a pod (ADDED or MODIFIED)."""
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
        with self._lock:
            before = self._pods.get(key)
            pod = self._stamp(pod)
            self._pods[key] = pod
            if record:
                self._events.append((self._rv, "MODIFIED" if before else "ADDED", pod, before))
        self._notify()

    def delete(self, name: str, namespace: str = NS, record: bool = True) -> None:
        with self._lock:
            pod = self._pods.pop((namespace, name))
            pod = self._stamp(pod)
            if record:
                self._events.append((self._rv, "DELETED", pod, pod))
        self._notify()

    def expire(self) -> None:
        """Compact the history: open watches and watches from before now get 410 Gone."""
        with self._lock:
            self._oldest_rv = self._rv
            self._generation += 1
        self._notify()

    def _stamp(self, pod: dict) -> dict:
        self._rv += 1
        pod = json.loads(json.dumps(pod))
        pod["metadata"]["resourceVersion"] = str(self._rv)
        return pod

    def _notify(self) -> None:
        def wake() -> None:
            if self._changed is not None:
                self._changed.set()
                self._changed = asyncio.Event()

        self._loop.call_soon_threadsafe(wake)

    # ---- serving

    def start(self) -> FakeKubeAPI:
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _start(self) -> None:
        self._changed = asyncio.Event()
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self._pods_handler)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            changed, self._changed = self._changed, None
            if changed is not None:
                changed.set()  # open watches end
            await runner.cleanup()

    async def _pods_handler(self, request: web.Request) -> web.StreamResponse:
        namespace, query = request.match_info["ns"], request.query
        selector = query.get("labelSelector", "")
        if query.get("watch") in ("true", "1"):
            return await self._watch(request, namespace, selector)
        self.requests.append("list")
        with self._lock:
            items = [
                pod
                for (ns, _), pod in self._pods.items()
                if ns == namespace and selector_matches(selector, pod["metadata"]["labels"])
            ]
            rv = self._rv
        return web.json_response(
            {
                "apiVersion": "v1",
                "kind": "PodList",
                "metadata": {"resourceVersion": str(rv)},
                "items": items,
            }
        )

    async def _watch(
        self, request: web.Request, namespace: str, selector: str
    ) -> web.StreamResponse:
        self.requests.append("watch")
        query = request.query
        cursor = int(query.get("resourceVersion") or 0)
        deadline = time.monotonic() + float(query.get("timeoutSeconds", 30))
        generation = self._generation
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        while True:
            changed = self._changed
            if changed is None:  # the server is going down
                break
            with self._lock:
                expired = cursor < self._oldest_rv or generation != self._generation
                events = [e for e in self._events if e[0] > cursor]
            if expired:
                await _write_line(response, _gone())
                break
            for rv, kind, pod, before in events:
                cursor = rv
                if pod["metadata"]["namespace"] != namespace:
                    continue
                kind = _seen_by(selector, kind, pod, before)
                if kind is not None:
                    await _write_line(response, {"type": kind, "object": pod})
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
        return response


def _seen_by(selector: str, kind: str, pod: dict, before: dict | None) -> str | None:
    """What a watch with this selector sees of a change: a pod that starts or stops matching
    is ADDED or DELETED for it, as the API server's watch cache does."""
    now = selector_matches(selector, pod["metadata"]["labels"])
    was = before is not None and selector_matches(selector, before["metadata"]["labels"])
    if kind == "MODIFIED" and now != was:
        return "ADDED" if now else "DELETED"
    return kind if now or was else None


def _gone() -> dict:
    status = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": "too old resource version",
        "reason": "Expired",
        "code": 410,
    }
    return {"type": "ERROR", "object": status}


async def _write_line(response: web.StreamResponse, event: dict) -> None:
    await response.write(json.dumps(event).encode() + b"\n")
