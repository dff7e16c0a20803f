"""The router's pods: health, load and event subscription, kept fresh by one polling task.

Each poll, per pod: `GET /health` (a failure takes the pod out of rotation and drops its index
entries), `GET /metrics` for its load, and on first sight its KV-event endpoint (configured, or
from vLLM's `GET /kv_event_sources`) is handed to the event ingestor.

With a token processor, a pod is first checked once it is healthy (again after it rejoins):
its /tokenize and its block size and hash algorithm must match the router's
(`TokenProcessor.verify_against_pod`). A pod that fails is routed by load alone: it is not
followed and `hash_verified()` leaves it out, so the index is never asked about it.
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
from vllm_llmd.router.tokens import TokenProcessor

logger = logging.getLogger(__name__)

# Seconds a health check or load scrape may take. Only a failed /health takes a pod out of
# rotation: an overloaded pod (or box) answers /metrics slowly yet serves fine.
HEALTH_TIMEOUT_S = 5.0


@dataclass
class PodState:
    spec: PodSpec
    healthy: bool = False
    load: PodLoad = field(default_factory=PodLoad)
    # requests this router has sent to the pod and not yet finished
    in_flight: int = 0
    subscribed: bool = False
    # the pod's tokens and block hashes match the router's; None: not checked since it joined
    hashes_ok: bool | None = None
    # the ingestor's remove_pod, running off the event loop; awaited before following again
    removal: asyncio.Future | None = None


class PodRegistry:
    """The pods the router may use, and what it knows about each."""

    def __init__(
        self,
        specs: tuple[PodSpec, ...],
        ingestor: EventIngestor | None,
        events_topic: str = "kv",
        poll_interval_s: float = 1.0,
        tokens: TokenProcessor | None = None,
    ) -> None:
        self.pods = {spec.pod_id: PodState(spec) for spec in specs}
        self.ingestor = ingestor
        self.tokens = tokens
        self.events_topic = events_topic
        self.poll_interval_s = poll_interval_s
        self._task: asyncio.Task | None = None

    def candidates(self, roles: tuple[str, ...]) -> list[str]:
        """Healthy pods with one of roles, in configuration order."""
        return [pid for pid, p in self.pods.items() if p.healthy and p.spec.role in roles]

    def hash_verified(self) -> list[str]:
        """Pods whose block hashes match the router's: the only ones worth an index lookup."""
        return [pid for pid, p in self.pods.items() if p.hashes_ok]

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
        pod = self.pods.get(pod_id)
        if pod is None:  # a target named by a request header, not one of ours
            return
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
            timeout = aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)
            async with session.get(url + "/health", timeout=timeout) as r:
                ok = r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            ok, why = False, str(exc) or type(exc).__name__
        else:
            why = "" if ok else f"/health answered {r.status}"
        if not ok:
            if pod.healthy:
                logger.warning("pod %s left the rotation: %s", url, why)
            pod.healthy = False
            self._forget(pod)
            return
        try:
            pod.load = await scrape_pod_load(
                session, url, timeout=HEALTH_TIMEOUT_S, num_in_flight=pod.in_flight
            )
        except PodLoadError as exc:
            # A slow /metrics on a busy box is not a dead pod: keep its last known load.
            logger.debug("pod %s: load not refreshed: %s", url, exc)
        if not pod.healthy:
            logger.info("pod %s joined the rotation", url)
        pod.healthy = True
        if ok and pod.hashes_ok is None and self.tokens is not None:
            pod.hashes_ok = await self._verify(session, pod)
        if ok and pod.hashes_ok and not pod.subscribed and self.ingestor is not None:
            await self._subscribe(session, pod)

    async def _verify(self, session: aiohttp.ClientSession, pod: PodState) -> bool:
        assert self.tokens is not None
        url = pod.spec.url
        try:
            async with session.get(url + "/v1/models", timeout=aiohttp.ClientTimeout(total=5)) as r:
                model = (await r.json())["data"][0]["id"]
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, IndexError) as exc:
            verdict_ok, reason = False, f"could not read its model from /v1/models: {exc!r}"
        else:
            verdict = await self.tokens.verify_against_pod(url, model, session=session)
            verdict_ok, reason = verdict.ok, verdict.reason
        if verdict_ok:
            logger.info("pod %s: %s", url, reason)
        else:
            logger.error(
                "HASH VERIFICATION FAILED for pod %s: %s. The router would compute block hashes "
                "the pod never publishes: this pod is routed by load alone (no prefix affinity) "
                "until it rejoins with a matching configuration (--tokenizer, --block-size, "
                "--hash-algorithm, --hash-seed).",
                url,
                reason,
            )
        return verdict_ok

    async def _subscribe(self, session: aiohttp.ClientSession, pod: PodState) -> None:
        events, replay = pod.spec.events, pod.spec.replay
        if events is None:
            events, replay = await discover_event_endpoints(session, pod.spec.url)
        if events is None:
            return  # the pod publishes no events: it is routed by load alone
        assert self.ingestor is not None
        if pod.removal is not None:
            await pod.removal
            pod.removal = None
        self.ingestor.add_pod(pod.spec.pod_id, events, replay, self.events_topic)
        pod.subscribed = True
        logger.info("pod %s: following KV events at %s (replay %s)", pod.spec.url, events, replay)

    def _forget(self, pod: PodState) -> None:
        if pod.subscribed and self.ingestor is not None:
            # Its index entries go with it. remove_pod waits for the ingest thread's poll of
            # this pod, which a replay from a dead pod holds for seconds: never on the event
            # loop, where it would time out every other pod's health check meanwhile.
            pod.removal = asyncio.get_running_loop().run_in_executor(
                None, self.ingestor.remove_pod, pod.spec.pod_id
            )
        pod.subscribed = False
        pod.hashes_ok = None  # it may come back as another engine: check it again


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
