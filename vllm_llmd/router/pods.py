"""The router's pods: health, load and event subscription, kept fresh by one polling task.

Each poll, per pod: `GET /health` (a failure takes the pod out of rotation and drops its index
entries), `GET /metrics` for its load, and on first sight its KV-event endpoint (configured, or
from vLLM's `GET /kv_event_sources`) is handed to the event ingestor.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp

from vllm_llmd.router.config import PodSpec
from vllm_llmd.router.ingest import EventIngestor
from vllm_llmd.router.load import PodLoad, PodLoadError, scrape_pod_load

logger = logging.getLogger(__name__)


@dataclass
class PodState:
    spec: PodSpec
    healthy: bool = False
    load: PodLoad = field(default_factory=PodLoad)
    # requests this router has sent to the pod and not yet finished
    in_flight: int = 0
    subscribed: bool = False


class PodRegistry:
    """The pods the router may use, and what it knows about each."""

    def __init__(
        self,
        specs: tuple[PodSpec, ...],
        ingestor: EventIngestor | None,
        events_topic: str = "kv",
        poll_interval_s: float = 1.0,
    ) -> None:
        self.pods = {spec.pod_id: PodState(spec) for spec in specs}
        self.ingestor = ingestor
        self.events_topic = events_topic
        self.poll_interval_s = poll_interval_s
        self._task: asyncio.Task | None = None

    def candidates(self, roles: tuple[str, ...]) -> list[str]:
        """Healthy pods with one of roles, in configuration order."""
        return [pid for pid, p in self.pods.items() if p.healthy and p.spec.role in roles]

    def loads(self) -> dict[str, PodLoad]:
        return {
            pid: PodLoad(p.load.num_waiting, p.load.num_running, p.load.kv_usage, p.in_flight)
            for pid, p in self.pods.items()
        }

    async def start(self, session: aiohttp.ClientSession) -> None:
        await self.poll_once(session)
        self._task = asyncio.create_task(self._loop(session))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def mark_unhealthy(self, pod_id: str, reason: str) -> None:
        """A request could not reach the pod: out of rotation until a health check passes."""
        pod = self.pods[pod_id]
        if pod.healthy:
            logger.warning("pod %s left the rotation: %s", pod_id, reason)
        pod.healthy = False
        self._forget(pod)

    async def _loop(self, session: aiohttp.ClientSession) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.poll_once(session)
            except Exception:  # a bug in one poll must not stop the next
                logger.exception("pod poll failed")

    async def poll_once(self, session: aiohttp.ClientSession) -> None:
        await asyncio.gather(*(self._poll(session, pod) for pod in self.pods.values()))

    async def _poll(self, session: aiohttp.ClientSession, pod: PodState) -> None:
        url = pod.spec.url
        try:
            async with session.get(url + "/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                ok = r.status == 200
            load = await scrape_pod_load(session, url, num_in_flight=pod.in_flight)
        except (aiohttp.ClientError, asyncio.TimeoutError, PodLoadError) as exc:
            if pod.healthy:
                logger.warning("pod %s left the rotation: %s", url, exc)
            pod.healthy = False
            self._forget(pod)
            return
        if ok and not pod.healthy:
            logger.info("pod %s joined the rotation", url)
        pod.healthy, pod.load = ok, load
        if ok and not pod.subscribed and self.ingestor is not None:
            await self._subscribe(session, pod)

    async def _subscribe(self, session: aiohttp.ClientSession, pod: PodState) -> None:
        events, replay = pod.spec.events, pod.spec.replay
        if events is None:
            events, replay = await discover_event_endpoints(session, pod.spec.url)
        if events is None:
            return  # the pod publishes no events: it is routed by load alone
        assert self.ingestor is not None
        self.ingestor.add_pod(pod.spec.pod_id, events, replay, self.events_topic)
        pod.subscribed = True
        logger.info("pod %s: following KV events at %s (replay %s)", pod.spec.url, events, replay)

    def _forget(self, pod: PodState) -> None:
        if pod.subscribed and self.ingestor is not None:
            self.ingestor.remove_pod(pod.spec.pod_id)  # its index entries go with it
        pod.subscribed = False


async def discover_event_endpoints(
    session: aiohttp.ClientSession, url: str
) -> tuple[str | None, str | None]:
    """The pod's (event, replay) endpoints from vLLM's GET /kv_event_sources (DP rank 0)."""
    try:
        async with session.get(
            url + "/kv_event_sources", timeout=aiohttp.ClientTimeout(total=2)
        ) as resp:
            if resp.status != 200:
                return None, None
            sources = await resp.json()
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return None, None
    if not sources:
        return None, None
    config = sources.get("0") or next(iter(sources.values()))
    if not config or not config.get("enable_kv_cache_events"):
        return None, None
    host = urlsplit(url).hostname or "127.0.0.1"
    return _connectable(config.get("endpoint"), host), _connectable(
        config.get("replay_endpoint"), host
    )


def _connectable(endpoint: str | None, host: str) -> str | None:
    """vLLM reports bind addresses (tcp://*:5557): connect to the pod's host instead."""
    if not endpoint:
        return None
    for wildcard in ("*", "0.0.0.0", "[::]"):
        endpoint = endpoint.replace(f"//{wildcard}:", f"//{host}:")
    return endpoint
