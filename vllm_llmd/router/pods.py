"""The router's pods: health, load and event subscription, kept fresh by one polling task.

Each poll, per pod: `GET /health`, `GET /metrics` for its load, and on first sight its KV-event
endpoint (configured, or from vLLM's `GET /kv_event_sources`), handed to the event ingestor. A
failed /health takes the pod out of rotation and drops its index entries; one that only timed
out must do so `slow_checks_to_evict` times in a row, because a busy pod on a loaded host
answers late yet serves.

With a token processor, a pod is first checked once it is healthy (again after it rejoins):
its /tokenize and its block size and hash algorithm must match the router's
(`TokenProcessor.verify_against_pod`). A pod that fails is routed by load alone: it is not
followed and `hash_verified()` leaves it out, so the index is never asked about it.

A pod's answers are not trusted to be well formed: a /metrics whose gauges are not finite
numbers leaves its load as it was, a /kv_event_sources that is not the expected object (or
endpoints the ingestor refuses) leaves it without events (routed by load alone, retried at the
next poll), each logged naming the pod and what was wrong; and any other failure in one pod's
poll is logged with its traceback and never stops the router or the other pods' polls.

Pods come from the static list and, at run time, from discovery (`router/k8s.py`), which calls
`add_pod` and `remove_pod` on the event loop. A new pod is polled at once; a removed one leaves
the rotation and its index entries go, as when its health check fails.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import aiohttp

from vllm_llmd.events.sources import BadEventSources, discover_event_endpoints
from vllm_llmd.router.config import PodSpec
from vllm_llmd.router.ingest import EventIngestor
from vllm_llmd.router.load import PodLoad, PodLoadError, scrape_pod_load
from vllm_llmd.router.pod_state import PodState, Sending
from vllm_llmd.router.tokens import TokenProcessor

logger = logging.getLogger(__name__)

# Seconds a health check or load scrape may take. Only a failed /health takes a pod out of
# rotation: an overloaded pod (or box) answers /metrics slowly yet serves fine.
HEALTH_TIMEOUT_S = 5.0
# /health checks in a row that time out before a pod leaves the rotation. A refused connection
# or an error status takes it out at once; a timeout alone may be a busy API server (leaving
# would also drop its index entries, the router's knowledge of its cache).
SLOW_CHECKS_TO_EVICT = 3


class PodRegistry:
    """The pods the router may use, and what it knows about each."""

    def __init__(
        self,
        specs: tuple[PodSpec, ...],
        ingestor: EventIngestor | None,
        events_topic: str = "kv",
        poll_interval_s: float = 1.0,
        tokens: TokenProcessor | None = None,
        health_timeout_s: float = HEALTH_TIMEOUT_S,
        slow_checks_to_evict: int = SLOW_CHECKS_TO_EVICT,
    ) -> None:
        if health_timeout_s <= 0 or slow_checks_to_evict < 1:
            raise ValueError("need health_timeout_s > 0 and slow_checks_to_evict >= 1")
        # pod id -> state, for the pods in use
        self.pods: dict[str, PodState] = {spec.pod_id: PodState(spec) for spec in specs}
        # removed pods with requests still in flight: their counts survive a quick return
        self._gone: dict[str, PodState] = {}
        self.ingestor = ingestor
        self.tokens = tokens
        self.events_topic = events_topic
        self.poll_interval_s = poll_interval_s
        self.health_timeout_s = health_timeout_s
        self.slow_checks_to_evict = slow_checks_to_evict
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        # first polls of pods added at run time
        self._joins: set[asyncio.Task[None]] = set()
        # called when a request's prefill work leaves a pod (its first byte, or its end
        # before one): prefill pacing's cue
        self.on_answering: Callable[[], None] | None = None

    def state(self, pod_id: str) -> PodState:
        """The pod's state, live or removed. An id that is no pod of ours (a target named by a
        header) gets a state of its own."""
        pod = self.pods.get(pod_id) or self._gone.get(pod_id)
        return pod if pod is not None else PodState(PodSpec(pod_id), removed=True)

    @contextmanager
    def sending(
        self,
        pod_id: str,
        prefill_tokens: int = 0,
        blocks: Sequence[int] = (),
        own_blocks: int = 0,
    ) -> Iterator[Sending]:
        """Count a request in flight to the pod while the block runs, and as prefilling (with
        its `prefill_tokens` uncached prompt tokens) until `answering()` is called on what it
        yields (the answer's first byte); and the KV blocks it holds there (`Sending`). The
        state is held across the block's awaits, so a pod removed meanwhile keeps the count
        (and has it again if it comes back before the request ends)."""
        state = self.state(pod_id)
        sending = Sending(state, max(0, prefill_tokens), blocks, own_blocks, self.on_answering)
        try:
            yield sending
        finally:
            sending.ended()

    def candidates(self, roles: tuple[str, ...]) -> list[str]:
        """Healthy pods with one of roles, in configuration order."""
        return [pid for pid, p in self.pods.items() if p.healthy and p.spec.role in roles]

    def problems(self) -> dict[str, dict[str, object]]:
        """Per pod: in rotation or not, its role, and what is wrong with it ("" if nothing)."""
        return {
            pid: {
                "healthy": p.healthy,
                "role": p.spec.role,
                "problem": "; ".join(
                    part for part in (p.health_problem, p.load_problem, p.events_problem) if part
                ),
            }
            for pid, p in self.pods.items()
        }

    def hash_verified(self) -> list[str]:
        """Pods whose block hashes match the router's: the only ones worth an index lookup."""
        return [pid for pid, p in self.pods.items() if p.hashes_ok]

    def loads(self) -> dict[str, PodLoad]:
        return {pid: p.current_load() for pid, p in self.pods.items()}

    async def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        await self.poll_once(session)
        self._task = asyncio.create_task(self._loop(session))

    async def stop(self) -> None:
        self._session = None
        tasks = [*self._joins, *([self._task] if self._task is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def add_pod(self, spec: PodSpec) -> bool:
        """Use a discovered pod; polled at once if the registry runs. False if already known.

        Call on the event loop. A pod that was removed and comes back keeps its in-flight count.
        """
        if spec.pod_id in self.pods:
            return False
        pod = self._gone.pop(spec.pod_id, None) or PodState(spec)
        pod.spec, pod.removed = spec, False
        self.pods[spec.pod_id] = pod
        logger.info("pod %s added (role %s)", spec.pod_id, spec.role)
        if self._session is not None:
            task = asyncio.create_task(self._poll(self._session, pod))
            self._joins.add(task)
            task.add_done_callback(self._joins.discard)
        return True

    def remove_pod(self, pod_id: str) -> bool:
        """Stop using a pod: out of rotation, its index entries dropped. False if unknown.

        Call on the event loop. Requests already sent to it finish (or fail) on their own.
        """
        pod = self.pods.pop(pod_id, None)
        if pod is None:
            return False
        logger.info("pod %s removed", pod_id)
        pod.removed, pod.healthy = True, False
        self._forget(pod)
        if pod.in_flight:
            self._gone[pod_id] = pod
        return True

    async def wait_joined(self) -> None:
        """Wait until the first poll of every pod added so far has finished."""
        await asyncio.gather(*self._joins, return_exceptions=True)

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
            self._gone = {pid: pod for pid, pod in self._gone.items() if pod.in_flight > 0}
            try:
                await self.poll_once(session)
            except Exception:  # a bug in one poll must not stop the next
                logger.exception("pod poll failed")

    async def poll_once(self, session: aiohttp.ClientSession) -> None:
        await asyncio.gather(*(self._poll(session, pod) for pod in list(self.pods.values())))

    async def _poll(self, session: aiohttp.ClientSession, pod: PodState) -> None:
        if pod.polling or pod.removed:
            return
        pod.polling = True
        try:
            await self._poll_pod(session, pod)
        except Exception:  # a pod's odd answer must not stop the router (nor the other pods)
            logger.exception("pod %s: its poll failed; polled again next round", pod.spec.url)
        finally:
            pod.polling = False

    async def _poll_pod(self, session: aiohttp.ClientSession, pod: PodState) -> None:
        # Every await may see the pod removed (discovery): then it must not rejoin.
        url = pod.spec.url
        slow = False
        try:
            timeout = aiohttp.ClientTimeout(total=self.health_timeout_s)
            async with session.get(url + "/health", timeout=timeout, allow_redirects=False) as r:
                ok = r.status == 200
        except asyncio.TimeoutError:  # before ClientError: aiohttp's timeouts are both
            ok, slow, why = False, True, f"/health took over {self.health_timeout_s:g} s"
        except aiohttp.ClientError as exc:
            ok, why = False, str(exc) or type(exc).__name__
        else:
            why = "" if ok else f"/health answered {r.status}"
        if pod.removed:
            return
        pod.slow_checks = pod.slow_checks + 1 if slow else 0
        if not ok:
            if pod.healthy and slow and pod.slow_checks < self.slow_checks_to_evict:
                logger.info(
                    "pod %s: %s (%d of %d in a row before it leaves the rotation)",
                    url,
                    why,
                    pod.slow_checks,
                    self.slow_checks_to_evict,
                )
                return  # still in rotation; its load is not read this time (as slow)
            if pod.healthy:
                logger.warning("pod %s left the rotation: %s", url, why)
            elif why != pod.health_problem:  # never in rotation yet, or failing differently
                logger.warning("pod %s is not in rotation: %s", url, why)
            pod.healthy, pod.health_problem = False, why
            self._forget(pod)
            return
        pod.health_problem = ""
        try:
            pod.load = await scrape_pod_load(
                session, url, timeout=self.health_timeout_s, num_in_flight=pod.in_flight
            )
        except PodLoadError as exc:
            # A slow /metrics on a busy box is not a dead pod: keep its last known load.
            self._load_problem(pod, exc.reason, logging.INFO)
        else:
            pod.load_problem = ""
        if pod.removed:
            return
        if not pod.healthy:
            logger.info("pod %s joined the rotation", url)
        pod.healthy = True
        if ok and pod.hashes_ok is None and self.tokens is not None:
            verified = await self._verify(session, pod)
            if pod.removed:
                return
            pod.hashes_ok = verified
        if ok and pod.hashes_ok and not pod.subscribed and self.ingestor is not None:
            await self._subscribe(session, pod)

    async def _verify(self, session: aiohttp.ClientSession, pod: PodState) -> bool:
        assert self.tokens is not None
        url = pod.spec.url
        try:
            async with session.get(
                url + "/v1/models", timeout=aiohttp.ClientTimeout(total=5), allow_redirects=False
            ) as r:
                model = (await r.json())["data"][0]["id"]
        except (
            aiohttp.ClientError,
            asyncio.TimeoutError,
            ValueError,
            KeyError,
            IndexError,
            TypeError,  # an answer of the wrong shape (a list where an object belongs)
        ) as exc:
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
            try:
                events, replay = await discover_event_endpoints(session, pod.spec.url)
            except BadEventSources as exc:
                self._events_problem(pod, str(exc))
                return
        if events is None:  # the pod publishes no events: it is routed by load alone
            if not pod.events_off_logged:
                pod.events_off_logged = True
                logger.error(
                    "pod %s passed hash verification but publishes no KV events, so the "
                    "router cannot see its prefix cache: it is routed by load alone "
                    "(llmd:router_events_subscribed 0). Start its vLLM with --kv-events-config "
                    '\'{"enable_kv_cache_events": true, "publisher": "zmq", '
                    '"endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558"}\' '
                    "or give the router its endpoint (--pod URL,events=tcp://HOST:5557).",
                    pod.spec.url,
                )
            return
        assert self.ingestor is not None
        if pod.removal is not None:
            removal = pod.removal
            await removal
            if pod.removal is removal:
                pod.removal = None
        if pod.removed or not pod.healthy:  # it left while we waited
            return
        try:
            # off the event loop: add_pod clears the pod in the index, a Redis round trip that
            # an unreachable Redis makes last its whole timeout
            await asyncio.get_running_loop().run_in_executor(
                None, self.ingestor.add_pod, pod.spec.pod_id, events, replay, self.events_topic
            )
        except Exception as exc:  # a refused endpoint (ValueError, ZMQError), the index down
            self._events_problem(pod, f"its KV events at {events} cannot be followed: {exc!r}")
            return
        pod.subscribed, pod.events_problem = True, ""
        if pod.removed or not pod.healthy:  # it left while add_pod ran: stop following it
            self._forget(pod)
            return
        logger.info("pod %s: following KV events at %s (replay %s)", pod.spec.url, events, replay)

    def _load_problem(self, pod: PodState, problem: str, level: int) -> None:
        """The pod's load was not read: log why when the reason changes (else every poll)."""
        if problem != pod.load_problem:
            logger.log(level, "pod %s: load not refreshed: %s", pod.spec.url, problem)
        pod.load_problem = problem

    def _events_problem(self, pod: PodState, problem: str) -> None:
        """The pod's events cannot be followed now: log why (once per reason), try next poll."""
        if problem != pod.events_problem:
            logger.warning("pod %s: %s; it is routed by load alone", pod.spec.url, problem)
        pod.events_problem = problem

    def _forget(self, pod: PodState) -> None:
        if pod.subscribed and self.ingestor is not None:
            # Its index entries go with it. remove_pod waits for a poll or replay of this pod
            # in progress, which a replay from a dead pod holds for seconds: never on the event
            # loop, where it would time out every other pod's health check meanwhile.
            pod.removal = asyncio.get_running_loop().run_in_executor(
                None, self.ingestor.remove_pod, pod.spec.pod_id
            )
        pod.subscribed = False
        pod.hashes_ok = None  # it may come back as another engine: check it again
