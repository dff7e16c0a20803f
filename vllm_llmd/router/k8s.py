"""Kubernetes pod discovery: the router's pods are the ready pods a label selector picks.

    list pods (namespace, label selector)  ->  watch from the list's resourceVersion
        ADDED / MODIFIED / DELETED  ->  wanted pods  ->  PodRegistry.add_pod / remove_pod
        410 Gone (the watch fell behind)  ->  list again (at once; backs off if it repeats)
        watch ends (timeoutSeconds)       ->  watch again from the last resourceVersion
        any other error                   ->  back off (0.5 s, doubling to 30 s), list again

A pod is used when it is Running, its Ready condition is True, it has a pod IP and it is not
being deleted. Its URL is `http://<podIP>:<port>`, with the port a number or the name of one of
its container ports (`--k8s-port`); its role is the value of a label (`--k8s-role-label`,
default llm-d's `llm-d.ai/role`: prefill, decode or both; no label: both). Its KV-event
endpoint comes from the pod itself (`GET /kv_event_sources`, see `pods.py`). A pod that stops
being ready, is deleted or no longer matches leaves the registry, and its index entries go.

The official `kubernetes` client is synchronous, so list and watch run on one daemon thread;
the thread hands each new set of wanted pods to the event loop (`call_soon_threadsafe`), where
`_reconcile` adds and removes registry pods. While the API server is unreachable, the pods
known last stay (their health checks still guard them).

Credentials: the pod's service account by default (in-cluster), a kubeconfig file if given, or
a plain API URL without credentials (`--k8s-api-url`, for tests and `kubectl proxy`).
The service account needs `list` and `watch` on pods in the namespace.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

from vllm_llmd.router.config import ROLES, PodSpec, RouterConfig, check_k8s_port, is_role
from vllm_llmd.router.pods import PodRegistry

logger = logging.getLogger(__name__)

DEFAULT_ROLE_LABEL = "llm-d.ai/role"
_SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# seconds to connect to the API server, and to read a list answer
_CONNECT_TIMEOUT_S = 5.0
_LIST_TIMEOUT_S = 30.0
# a watch is silent between events: its read timeout is the watch's own length plus this
_WATCH_READ_SLACK_S = 10.0


class K8sDiscoveryError(RuntimeError):
    """Discovery cannot start (client missing, no credentials); the message says what to do."""


def import_kubernetes() -> ModuleType:
    """The `kubernetes` package, or a K8sDiscoveryError naming the extra that installs it."""
    try:
        import kubernetes
    except ImportError as exc:
        raise K8sDiscoveryError(
            "Kubernetes discovery needs the kubernetes client: pip install 'vllm-llmd[k8s]'"
        ) from exc
    return kubernetes


def why_not_serving(pod: Any) -> str | None:
    """Why a pod (a V1Pod) cannot take requests now; None if it can."""
    if pod.metadata.deletion_timestamp is not None:
        return "being deleted"
    status = pod.status
    if status is None or status.phase != "Running":
        return f"phase {status.phase if status else None}"
    if not status.pod_ip:
        return "no pod IP"
    ready = [c.status for c in status.conditions or () if c.type == "Ready"]
    if ready != ["True"]:
        return "not ready"
    return None


def pod_spec(pod: Any, port: str, role_label: str = DEFAULT_ROLE_LABEL) -> PodSpec:
    """The PodSpec of a serving pod (a V1Pod); ValueError if its port or role is unusable.

    Args:
        pod: the pod, as the kubernetes client returns it.
        port: a port number, or the name of one of the pod's container ports.
        role_label: the label whose value (prefill, decode, both) is the pod's role.
    """
    number = int(port) if port.isdigit() else _named_port(pod, port)
    role = (pod.metadata.labels or {}).get(role_label, "both")
    if not is_role(role):
        raise ValueError(f"label {role_label}={role!r} is not one of {', '.join(ROLES)}")
    host = pod.status.pod_ip
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return PodSpec(f"http://{host}:{number}", role)


def _named_port(pod: Any, name: str) -> int:
    for container in pod.spec.containers or ():
        for container_port in container.ports or ():
            if container_port.name == name:
                return int(container_port.container_port)
    raise ValueError(f"no container port named {name!r}")


class K8sDiscovery:
    """Keeps a PodRegistry's discovered pods equal to the serving pods a selector picks.

    `start(registry)` (on the event loop) starts the thread and waits, up to `startup_wait_s`,
    for the first list and the first poll of the pods it found, so a router serves right away.
    `stop()` ends the thread. Pods also given statically (`--pod`, same URL) are left alone.
    """

    def __init__(
        self,
        label_selector: str,
        *,
        namespace: str | None = None,
        port: str = "8000",
        role_label: str = DEFAULT_ROLE_LABEL,
        kubeconfig: str | None = None,
        api_url: str | None = None,
        watch_timeout_s: float = 300.0,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 30.0,
        startup_wait_s: float = 10.0,
    ) -> None:
        if (port_error := check_k8s_port(port)) is not None:
            raise ValueError(port_error)
        self.label_selector = label_selector
        self.port = port
        self.role_label = role_label
        self.watch_timeout_s = watch_timeout_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.startup_wait_s = startup_wait_s
        self._k8s = import_kubernetes()
        configuration, default_namespace = self._client_configuration(kubeconfig, api_url)
        configuration.retries = False  # discovery retries on its own, with back-off
        self.namespace = namespace or default_namespace
        self._api_client = self._k8s.client.ApiClient(configuration)
        self._api = self._k8s.client.CoreV1Api(self._api_client)
        # thread side: serving pods by name, and the last set handed to the loop
        self._serving: dict[str, PodSpec] = {}
        self._published: dict[str, PodSpec] | None = None
        self._skipped: dict[str, str] = {}  # pod name -> why (logged once per reason)
        self._watch: Any = None
        self._num_expired = 0  # watches in a row that expired (410) before any event
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._thread = threading.Thread(target=self._run, name="k8s-discovery", daemon=True)
        # loop side: the pods this discovery added to the registry, by URL
        self._owned: dict[str, PodSpec] = {}
        self._registry: PodRegistry | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # counters, for tests and logs
        self.num_lists = 0
        self.num_errors = 0

    @classmethod
    def from_config(cls, config: RouterConfig) -> K8sDiscovery:
        """The discovery the router's `--k8s-*` flags ask for."""
        assert config.k8s_label_selector is not None
        return cls(
            config.k8s_label_selector,
            namespace=config.k8s_namespace,
            port=config.k8s_port,
            role_label=config.k8s_role_label,
            kubeconfig=config.k8s_kubeconfig,
            api_url=config.k8s_api_url,
        )

    def _client_configuration(self, kubeconfig: str | None, api_url: str | None) -> tuple[Any, str]:
        """(client Configuration, namespace to use when none is given)."""
        k8s = self._k8s
        configuration = k8s.client.Configuration()
        if api_url:
            configuration.host = api_url.rstrip("/")
            return configuration, "default"
        if kubeconfig:
            try:
                k8s.config.load_kube_config(kubeconfig, client_configuration=configuration)
                _, active = k8s.config.list_kube_config_contexts(kubeconfig)
            except (k8s.config.ConfigException, OSError) as exc:
                raise K8sDiscoveryError(f"--k8s-kubeconfig {kubeconfig}: {exc}") from exc
            return configuration, (active or {}).get("context", {}).get("namespace", "default")
        try:
            k8s.config.load_incluster_config(client_configuration=configuration)
        except k8s.config.ConfigException as exc:
            raise K8sDiscoveryError(
                f"not inside a Kubernetes pod ({exc}): give --k8s-kubeconfig FILE to discover "
                "pods from outside the cluster"
            ) from exc
        try:
            return configuration, _SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
        except OSError:
            return configuration, "default"

    # ---- the event loop's side ---------------------------------------------------------------

    async def start(self, registry: PodRegistry) -> None:
        """Start following the pods; returns after the first list (or `startup_wait_s`)."""
        self._registry = registry
        self._loop = asyncio.get_running_loop()
        logger.info(
            "discovering pods in namespace %s with labels %s (port %s, role label %s)",
            self.namespace,
            self.label_selector,
            self.port,
            self.role_label,
        )
        self._thread.start()
        synced = await self._loop.run_in_executor(None, self._synced.wait, self.startup_wait_s)
        if not synced:
            logger.warning("no pod list from the Kubernetes API yet: starting without pods")
        await registry.wait_joined()

    async def stop(self) -> None:
        """Stop the thread (pods stay in the registry). Idempotent."""
        self._stop.set()
        watch = self._watch
        if watch is not None:
            watch.stop()  # unblocks a read in progress
        if self._thread.is_alive():
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 5.0)
        self._api_client.close()

    def _reconcile(self, wanted: dict[str, PodSpec]) -> None:
        """Make the registry's discovered pods `wanted` (url -> spec). Runs on the loop."""
        registry = self._registry
        if registry is None or self._stop.is_set():
            return
        for url, spec in list(self._owned.items()):
            if wanted.get(url) != spec:
                registry.remove_pod(url)
                del self._owned[url]
        for url, spec in wanted.items():
            if url not in self._owned and registry.add_pod(spec):
                self._owned[url] = spec

    # ---- the thread's side ---------------------------------------------------------------------

    def _run(self) -> None:
        delay = self.retry_initial_s
        while not self._stop.is_set():
            try:
                resource_version = self._list()
                delay = self.retry_initial_s
                while not self._stop.is_set():
                    resource_version = self._watch_from(resource_version)
                    self._num_expired = 0
            except Exception as exc:
                if self._stop.is_set():
                    break
                if getattr(exc, "status", None) == 410:
                    # The watch fell behind: list again, at once unless it keeps expiring.
                    self._num_expired += 1
                    logger.info("pod watch expired (410 Gone): listing the pods again")
                    if self._num_expired == 1:
                        continue
                else:
                    self.num_errors += 1
                    logger.warning(
                        "Kubernetes pod discovery failed (%s); known pods stay, retrying in %.1fs",
                        _describe(exc),
                        delay,
                    )
                self._stop.wait(delay)
                delay = min(delay * 2, self.retry_max_s)

    def _list(self) -> str:
        """List the pods, replace what is known, return the list's resourceVersion."""
        answer = self._api.list_namespaced_pod(
            self.namespace,
            label_selector=self.label_selector,
            _request_timeout=(_CONNECT_TIMEOUT_S, _LIST_TIMEOUT_S),
        )
        self.num_lists += 1
        self._serving = {}
        for pod in answer.items:
            self._update(pod)
        self._publish()
        self._synced.set()
        return str(answer.metadata.resource_version)

    def _watch_from(self, resource_version: str) -> str:
        """Follow changes until the watch ends; return the last resourceVersion seen."""
        watch = self._k8s.watch.Watch()
        self._watch = watch
        if self._stop.is_set():  # stop() came before there was a watch to stop
            return resource_version
        try:
            for event in watch.stream(
                self._api.list_namespaced_pod,
                self.namespace,
                label_selector=self.label_selector,
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=int(self.watch_timeout_s),
                _request_timeout=(_CONNECT_TIMEOUT_S, self.watch_timeout_s + _WATCH_READ_SLACK_S),
            ):
                if self._stop.is_set():
                    break
                kind, pod = event["type"], event["object"]
                self._num_expired = 0
                if kind == "DELETED":
                    self._drop(pod.metadata.name, "deleted")
                elif kind in ("ADDED", "MODIFIED"):
                    self._update(pod)
                self._publish()
        finally:
            self._watch = None
        return watch.resource_version or resource_version

    def _update(self, pod: Any) -> None:
        name = pod.metadata.name
        reason = why_not_serving(pod)
        if reason is None:
            try:
                spec = pod_spec(pod, self.port, self.role_label)
            except ValueError as exc:
                reason = str(exc)
                if self._skipped.get(name) != reason:
                    logger.warning("pod %s is ready but not used: %s", name, reason)
            else:
                self._skipped.pop(name, None)
                if self._serving.get(name) != spec:
                    logger.info("pod %s serves at %s (role %s)", name, spec.url, spec.role)
                self._serving[name] = spec
                return
        self._skipped[name] = reason
        self._drop(name, reason)

    def _drop(self, name: str, reason: str) -> None:
        if self._serving.pop(name, None) is not None:
            logger.info("pod %s left: %s", name, reason)
        if reason == "deleted":
            self._skipped.pop(name, None)

    def _publish(self) -> None:
        wanted = {spec.url: spec for spec in self._serving.values()}
        if wanted == self._published:
            return
        self._published = wanted
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._reconcile, dict(wanted))
        except RuntimeError:  # the loop is closed: the router is shutting down
            self._stop.set()


def _describe(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    if status is not None:  # an ApiException: the API server answered
        return f"HTTP {status} {getattr(exc, 'reason', '')}".strip()
    return f"{type(exc).__name__}: {exc}"
