"""The router's HTTP face: an OpenAI-compatible proxy (aiohttp) over the pods.

For `/v1/completions` and `/v1/chat/completions`:

    validate (JSON, model, size, API key) -> tokenize + block hashes -> index lookup per pod
      -> policy picks the decode pod (and, for a long uncached prompt with prefill pods, the
         prefill pod: it runs the prompt with max_tokens=1 and kv_transfer_params
         {"do_remote_decode": true}; its answer's kv_transfer_params go to the decode pod)
      -> forward, streaming the pod's bytes back; connection failures before any byte was sent
         retry on the next-best pod

The same X-Request-Id travels to every pod of a request. Each decision is counted in /metrics
and, with --audit-log, written as one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from vllm_llmd.events.model import MEDIUM_GPU, MEDIUM_SHARED
from vllm_llmd.router.config import RouterConfig
from vllm_llmd.router.index import Index
from vllm_llmd.router.latency import LatencyModels, Prediction, RequestShape
from vllm_llmd.router.load import PodLoad
from vllm_llmd.router.metrics import RouterMetrics
from vllm_llmd.router.pods import PodRegistry
from vllm_llmd.router.predictive import SLOPlanner, request_shape
from vllm_llmd.router.recent import RecentRoutes
from vllm_llmd.router.scoring import Decision, PodCache, PolicyName, ScoreInput, ScoringPolicy
from vllm_llmd.router.shared_view import SharedTierView, extend_with_shared, extended
from vllm_llmd.router.slo import (
    AdmissionQueue,
    QueuedRequest,
    QueueFullError,
    RequestClass,
    SLOHeaderError,
)
from vllm_llmd.router.tokens import TokenProcessor, UnsupportedRequestError

logger = logging.getLogger(__name__)

DECODE_ROLES = ("both", "decode")
PREFILL_ROLES = ("prefill",)
# how often the admission queue is re-judged while it holds requests
QUEUE_TICK_S = 0.05
# the requests metric's status for a request whose client disconnected first (nginx's 499)
CLIENT_CLOSED_STATUS = "499"
# headers of the pod's answer that must not be copied onto ours
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "server", "date"}


@dataclass
class Route:
    """Where one request goes, and why (also the audit record)."""

    request_id: str
    decode: Decision
    prefill: Decision | None
    num_prompt_tokens: int | None
    hit_tokens: int
    # every pod's load as the router saw it when it chose
    loads: Mapping[str, PodLoad]
    request_class: RequestClass
    # the request on the decode pod at dispatch (what its latency model learns from)
    shape: RequestShape
    # the decode pod's predicted latency (None: model cold)
    prediction: Prediction | None = None
    # seconds the request waited in the router's admission queue
    queued_s: float = 0.0
    # "met": admitted at once; "queued": waited, then admitted; "late": dispatched when its
    # deadline passed without a pod predicted to meet its SLO
    admission: str = "met"
    # the request on the prefill pod at dispatch, for a P/D route
    prefill_shape: RequestShape | None = None
    # each pod's cached run of the prompt as scored (its own tiers, prefixes just routed
    # there, then the shared tier)
    caches: Mapping[str, PodCache] = field(default_factory=dict)


class Router:
    """Request handling; the aiohttp app is `make_app(router)`."""

    def __init__(
        self,
        config: RouterConfig,
        registry: PodRegistry,
        index: Index | None,
        tokens: TokenProcessor | None,
        policy: ScoringPolicy,
        metrics: RouterMetrics,
        shared: SharedTierView | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.index = index
        self.shared = shared
        ttl = config.recent_route_ttl_s
        self.recent = RecentRoutes(ttl) if ttl > 0 else None
        self.tokens = tokens
        self.policy = policy
        self.metrics = metrics
        self.session: aiohttp.ClientSession | None = None
        self._audit = open(config.audit_log, "a") if config.audit_log else None
        # Every policy learns the pods' latency (exported as metrics); `slo` also routes on it.
        self.slo_config = config.slo_config()
        self.latency = LatencyModels(config.latency_min_samples)
        self.planner: SLOPlanner | None = None
        self.queue: AdmissionQueue | None = None
        if config.policy == PolicyName.SLO.value:
            self.planner = SLOPlanner(
                self.latency,
                policy,
                config.scoring_config(),
                config.block_size,
                self.slo_config.headroom,
            )
            self.queue = AdmissionQueue(self.slo_config.max_queue)
        self._ticker: asyncio.Task | None = None

    # ---- requests ------------------------------------------------------------------------

    async def handle_generate(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        route_name = request.path
        try:
            self._check_api_key(request)
            body = await _read_json(request)
            request_class = self._classify(request.headers, body)
            hashes, num_tokens = self._hashes(request.path, body)
            admission, queued_s = await self._admit(hashes, num_tokens, request_class)
            route = self._route(
                request.path, body, request.headers, hashes, num_tokens, request_class
            )
            route.queued_s, route.admission = queued_s, admission
            self._record(route, body)
            if route.prefill is not None:
                body = await self._run_prefill(request.path, body, route)
            response = await self._forward(request, body, route)
        except web.HTTPException as exc:
            self.metrics.requests.labels(route_name, str(exc.status)).inc()
            raise
        except asyncio.CancelledError:  # the client left (cli.py: handler_cancellation)
            self.metrics.requests.labels(route_name, CLIENT_CLOSED_STATUS).inc()
            raise
        except _ClientLeft:  # it left while we wrote, before its cancellation came
            self.metrics.requests.labels(route_name, CLIENT_CLOSED_STATUS).inc()
            # as a cancellation: aiohttp closes quietly (an exception would be a logged 500)
            raise asyncio.CancelledError from None
        finally:
            self._pump()  # a finished request may make room for a queued one
        self.metrics.requests.labels(route_name, str(response.status)).inc()
        self.metrics.latency.labels(route_name).observe(time.monotonic() - started)
        return response

    def _check_api_key(self, request: web.Request) -> None:
        if (
            self.config.api_key
            and request.headers.get("Authorization") != f"Bearer {self.config.api_key}"
        ):
            raise _error(web.HTTPUnauthorized, "missing or wrong API key")

    def _classify(self, headers: Mapping[str, str], body: dict[str, Any]) -> RequestClass:
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise _error(web.HTTPBadRequest, "the request has no 'model'")
        try:
            return self.slo_config.classify(headers, body["model"])
        except SLOHeaderError as exc:
            raise _error(web.HTTPBadRequest, str(exc)) from None

    # ---- admission (policy slo) ----------------------------------------------------------

    def _admissible(
        self, hashes: list[int], num_tokens: int | None, request_class: RequestClass
    ) -> bool:
        """A pod can take the request now: not all saturated, one predicted to meet its SLO."""
        assert self.planner is not None
        decode_pods = self.registry.candidates(DECODE_ROLES)
        if not decode_pods:
            return True  # _route answers 503
        request = ScoreInput(len(hashes), decode_pods, self._caches(hashes), self.registry.loads())
        if self.planner.all_saturated(request):
            return False
        # Only a miss that load causes is worth waiting for (see SLOChoice.meets_when_idle).
        return not self.planner.choose(request, num_tokens, request_class.slo).load_bound

    async def _admit(
        self, hashes: list[int], num_tokens: int | None, request_class: RequestClass
    ) -> tuple[str, float]:
        """Wait until the request may go; (admission, seconds queued). 429/503 when refused."""
        if self.queue is None:
            return "met", 0.0
        # Never ahead of queued requests: they go first, in queue order (by _pump).
        if not len(self.queue) and self._admissible(hashes, num_tokens, request_class):
            return "met", 0.0
        if request_class.sheddable:
            self.metrics.admissions.labels("shed").inc()
            raise _error(
                web.HTTPTooManyRequests,
                "no pod can serve this request within its SLO now; retry later",
                headers={"Retry-After": str(self._retry_after_s())},
            )
        arrival = time.monotonic()
        timeout = request_class.slo.ttft_s or self.slo_config.queue_timeout_s
        entry = QueuedRequest(
            request_class,
            arrival,
            arrival + timeout,
            lambda: self._admissible(hashes, num_tokens, request_class),
            asyncio.get_running_loop().create_future(),
        )
        try:
            self.queue.push(entry)
        except QueueFullError as exc:
            self.metrics.admissions.labels("rejected").inc()
            raise _error(web.HTTPServiceUnavailable, str(exc)) from None
        self._ensure_ticker()
        self._pump()
        try:
            admitted = await entry.admitted
        finally:
            self.queue.remove(entry)  # no-op unless the client left while queued
        admission = "queued" if admitted else "late"
        self.metrics.admissions.labels(admission).inc()
        return admission, time.monotonic() - arrival

    def _retry_after_s(self) -> int:
        """Whole seconds a shed client should wait: about one load poll, at least 1."""
        return max(1, round(self.config.poll_interval_s))

    def _pump(self) -> None:
        """Admit queued requests in queue order while the head is admissible; expire the rest."""
        if self.queue is None or not len(self.queue):
            return
        for entry in self.queue.expired(time.monotonic()):
            self.queue.remove(entry)
            if not entry.admitted.done():
                entry.admitted.set_result(False)
        # One at a time: an admitted request is counted in flight only once its coroutine
        # runs, so the next is judged on the next tick, against the updated counts.
        head = self.queue.peek()
        if head is not None and head.admissible():
            self.queue.pop()
            if not head.admitted.done():
                head.admitted.set_result(True)

    def _ensure_ticker(self) -> None:
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        """Re-judge the queue while it holds requests (loads change with every poll)."""
        assert self.queue is not None
        while len(self.queue):
            self._pump()
            await asyncio.sleep(QUEUE_TICK_S)

    # ---- routing -------------------------------------------------------------------------

    def _route(
        self,
        path: str,
        body: dict[str, Any],
        headers: Mapping[str, str],
        hashes: list[int],
        num_tokens: int | None,
        request_class: RequestClass,
    ) -> Route:
        chosen_prefill = self._prefill_from_headers(headers)
        decode_pods = self.registry.candidates(DECODE_ROLES)
        if not decode_pods:
            raise _error(web.HTTPServiceUnavailable, "no healthy pod can serve this request")
        caches = self._caches(hashes)
        loads = self.registry.loads()
        request = ScoreInput(len(hashes), decode_pods, caches, loads)
        prediction = None
        if self.planner is not None:
            choice = self.planner.choose(request, num_tokens, request_class.slo)
            decode, prediction = choice.decision, choice.prediction
        else:
            decode = self.policy.choose(request)
        shape = request_shape(request, decode.pod, num_tokens or 0, self.config.block_size)
        if prediction is None:  # learn and report for every policy
            prediction = self.latency.predict(decode.pod, "direct", shape)
        prefill = None
        hit_tokens = decode.hit_blocks * self.config.block_size
        prefill_pods = self.registry.candidates(PREFILL_ROLES)
        uncached = (num_tokens or 0) - hit_tokens
        if chosen_prefill is not None:  # chosen upstream (llm-d's gateway): honour it
            prefill = Decision(chosen_prefill, "prefill chosen upstream (header)", {}, 0)
        elif prefill_pods and num_tokens is not None and uncached > self.config.pd_threshold_tokens:
            prefill_request = ScoreInput(len(hashes), prefill_pods, caches, loads)
            if self.planner is not None:
                slo = request_class.slo
                choice = self.planner.choose(prefill_request, num_tokens, slo, mode="prefill")
                prefill = choice.decision
            else:
                prefill = self.policy.choose(prefill_request)
        request_id = headers.get("X-Request-Id") or str(uuid.uuid4())
        prefill_shape = None
        if prefill is not None and prefill.pod in loads:
            prefill_shape = request_shape(
                ScoreInput(len(hashes), [prefill.pod], caches, loads),
                prefill.pod,
                num_tokens or 0,
                self.config.block_size,
            )
        if self.recent is not None and hashes:
            for chosen in (decode, prefill):
                if chosen is not None and chosen.pod in loads:  # ours, not a header's
                    self.recent.record(chosen.pod, hashes)
        return Route(
            request_id,
            decode,
            prefill,
            num_tokens,
            hit_tokens,
            loads,
            request_class,
            shape,
            prediction if prediction.ttft_s is not None else None,
            prefill_shape=prefill_shape,
            caches=caches,
        )

    def _prefill_from_headers(self, headers: Mapping[str, str]) -> str | None:
        """The prefill target an upstream gateway named, if allowed (else 403)."""
        host_port = headers.get("x-prefiller-host-port")
        url = f"http://{host_port.strip()}" if host_port else headers.get("x-prefiller-url")
        if not url:
            return None
        url = url.strip().rstrip("/")
        allowed = {pid for pid, pod in self.registry.pods.items() if pod.spec.role in PREFILL_ROLES}
        allowed |= {
            f"http://{target.strip()}"
            for target in (self.config.prefill_allowlist or "").split(",")
            if target.strip()
        }
        if url not in allowed:
            raise _error(
                web.HTTPForbidden, f"prefill target {url} is not in this router's allowlist"
            )
        return url

    def _hashes(self, path: str, body: Mapping[str, Any]) -> tuple[list[int], int | None]:
        if self.tokens is None:
            return [], None
        try:
            tokenized = self.tokens.tokenize_request(path, body)
        except UnsupportedRequestError as exc:
            logger.debug("routing by load alone: %s", exc)
            return [], None
        return list(tokenized.block_hashes), len(tokenized.token_ids)

    def _caches(self, hashes: list[int]) -> dict[str, PodCache]:
        verified = self.registry.hash_verified()  # a pod whose hashes differ has no prefix here
        if self.index is None or not hashes or not verified:
            return {}
        hits = self.index.lookup_prefix(hashes, pods=verified)
        caches = {pod: PodCache(hit.num_blocks, hit.tiers) for pod, hit in hits.items()}
        if self.recent is not None:  # sent there, its events not in yet
            for pod in verified:
                run = self.recent.run_length(pod, hashes)
                if run:
                    caches[pod] = extended(caches.get(pod) or PodCache(), run, MEDIUM_GPU)
        if self.shared is None or not (members := self.shared.members().intersection(verified)):
            return caches
        return extend_with_shared(caches, members, self.shared.run_length(hashes))

    def _record(self, route: Route, body: Mapping[str, Any]) -> None:
        kind = "pd" if route.prefill else "direct"
        self.metrics.decisions.labels(self.config.policy, kind).inc()
        self.metrics.hit_tokens.observe(route.hit_tokens)
        if self._audit is None:
            return
        record = {
            "ts": time.time(),
            "request_id": route.request_id,
            "decode_pod": route.decode.pod,
            "decode_reason": route.decode.reason,
            "decode_scores": route.decode.scores,
            "prefill_pod": route.prefill.pod if route.prefill else None,
            "prefill_reason": route.prefill.reason if route.prefill else None,
            "prompt_tokens": route.num_prompt_tokens,
            "hit_tokens": route.hit_tokens,
            # per pod: cached blocks in a row, and how many of them only the shared tier holds
            "cached_blocks": {pod: cache.num_blocks for pod, cache in route.caches.items()},
            "shared_blocks": {
                pod: cache.tiers.count(MEDIUM_SHARED) for pod, cache in route.caches.items()
            },
            "priority": route.request_class.priority,
            "fairness_id": route.request_class.fairness_id,
            "slo_ttft_s": route.request_class.slo.ttft_s,
            "slo_tpot_s": route.request_class.slo.tpot_s,
            "admission": route.admission,
            "queued_s": route.queued_s,
            "predicted_ttft_s": route.prediction.ttft_s if route.prediction else None,
            "predicted_tpot_s": route.prediction.tpot_s if route.prediction else None,
            "loads": {
                pod: {
                    "waiting": load.num_waiting,
                    "running": load.num_running,
                    "kv_usage": load.kv_usage,
                    "in_flight": load.num_in_flight,
                }
                for pod, load in route.loads.items()
            },
        }
        if self.config.audit_prompts:
            record["prompt"] = body.get("prompt", body.get("messages"))
        self._audit.write(json.dumps(record) + "\n")
        self._audit.flush()

    # ---- upstream ------------------------------------------------------------------------

    async def _post(
        self, url: str, body: dict[str, Any], headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        """POST with one retry when the pod closed a pooled keep-alive connection as we sent
        (uvicorn closes idle ones after 5 s; aiohttp may pick one in that instant): the pod
        dropped the connection without an answer, or it was gone before the body was written,
        and the pod is not down. A failed connect (ClientConnectorError) is not retried: that
        pod is unreachable, and the caller tries the next one."""
        assert self.session is not None
        try:
            return await self.session.post(url, json=body, headers=headers)
        except aiohttp.ClientConnectorError:
            raise
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            return await self.session.post(url, json=body, headers=headers)

    async def _run_prefill(self, path: str, body: dict[str, Any], route: Route) -> dict[str, Any]:
        """Run the prompt on the prefill pod; the decode request carries its KV params."""
        assert route.prefill is not None and self.session is not None
        prefill_body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        prefill_body.update(
            max_tokens=1, stream=False, kv_transfer_params={"do_remote_decode": True}
        )
        if "max_completion_tokens" in prefill_body:
            prefill_body["max_completion_tokens"] = 1
        for key in ("min_tokens", "min_completion_tokens"):
            prefill_body.pop(key, None)
        url = route.prefill.pod + path
        headers = {"X-Request-Id": route.request_id}
        sent = time.monotonic()
        try:
            async with await self._post(url, prefill_body, headers) as resp:
                answer = await resp.json(content_type=None)
                if resp.status != 200:
                    raise _upstream_error(resp.status, answer)
            if route.prefill_shape is not None:  # one output token: its time is the TTFT
                ttft = time.monotonic() - sent
                self.latency.observe(route.prefill.pod, "prefill", route.prefill_shape, ttft, None)
                self.metrics.observed_ttft.labels(route.prefill.pod, "prefill").observe(ttft)
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            # The decode pod can still serve it alone, recomputing the prompt.
            self.registry.mark_unhealthy(route.prefill.pod, str(exc))
            logger.warning("prefill on %s failed (%s): decoding alone", route.prefill.pod, exc)
            return body
        params = answer.get("kv_transfer_params")
        return {**body, "kv_transfer_params": params} if params else body

    async def _forward(
        self, request: web.Request, body: dict[str, Any], route: Route
    ) -> web.StreamResponse:
        assert self.session is not None
        order = sorted(route.decode.scores, key=lambda p: -route.decode.scores[p])
        order.remove(route.decode.pod)
        last_error: Exception | None = None
        for pod in [route.decode.pod, *order]:
            state = self.registry.state(pod)  # held: the pod may be removed meanwhile
            state.in_flight += 1
            try:
                return await self._stream_from(pod, request, body, route)
            except _NotStarted as exc:  # nothing reached the client yet: try the next pod
                last_error = exc.cause
                self.registry.mark_unhealthy(pod, str(exc.cause))
                self.metrics.retries.inc()
            finally:
                state.in_flight -= 1
        raise _error(web.HTTPBadGateway, f"no pod could be reached: {last_error}")

    async def _stream_from(
        self, pod: str, request: web.Request, body: dict[str, Any], route: Route
    ) -> web.StreamResponse:
        assert self.session is not None
        headers = {"X-Request-Id": route.request_id}
        sent = time.monotonic()
        try:
            upstream = await self._post(pod + request.path, body, headers)
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            raise _NotStarted(exc) from exc
        first_byte = None
        num_events = 0
        async with upstream:
            response = web.StreamResponse(status=upstream.status)
            for name, value in upstream.headers.items():
                if name.lower() not in _HOP_HEADERS:
                    response.headers[name] = value
            response.headers["X-Request-Id"] = route.request_id
            response.headers["X-Routed-To"] = pod
            try:
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    if first_byte is None:
                        first_byte = time.monotonic()
                    num_events += chunk.count(b"data:")
                    await response.write(chunk)
                await response.write_eof()
            except ConnectionResetError as exc:  # our client's connection, not the pod's
                raise _ClientLeft() from exc
        if upstream.status == 200 and first_byte is not None and pod == route.decode.pod:
            mode = "decode" if route.prefill is not None else "direct"
            self._observe(pod, mode, route, body, sent, first_byte, num_events)
        return response

    def _observe(
        self,
        pod: str,
        mode: str,
        route: Route,
        body: Mapping[str, Any],
        sent: float,
        first_byte: float,
        num_events: int,
    ) -> None:
        """Teach the pod's latency model what this answer took.

        A streamed answer gives TTFT (its first chunk) and TPOT (the rest over the tokens: one
        SSE event per token, less the final [DONE]); an unstreamed one with one output token
        gives TTFT; other unstreamed answers say nothing separable and are not used.
        """
        end = time.monotonic()
        ttft = tpot = None
        if body.get("stream"):
            ttft = first_byte - sent
            num_tokens = num_events - 1
            if num_tokens >= 2:
                tpot = (end - first_byte) / (num_tokens - 1)
        elif _max_tokens(body) == 1:
            ttft = end - sent
        if ttft is None:
            return
        if route.prediction is not None and route.prediction.ttft_s is not None and ttft > 0:
            error = abs(route.prediction.ttft_s - ttft) / ttft
            self.metrics.ttft_error.labels(pod, mode).observe(error)
        self.latency.observe(pod, mode, route.shape, ttft, tpot)
        model = self.latency.model(pod, mode)
        self.metrics.model_samples.labels(pod, mode).set(model.ttft.num_samples)
        self.metrics.observed_ttft.labels(pod, mode).observe(ttft)

    # ---- other endpoints -----------------------------------------------------------------

    async def handle_models(self, request: web.Request) -> web.Response:
        assert self.session is not None
        self._check_api_key(request)
        for pod in self.registry.candidates(DECODE_ROLES + PREFILL_ROLES):
            try:
                async with self.session.get(pod + "/v1/models") as resp:
                    return web.json_response(await resp.json(), status=resp.status)
            except aiohttp.ClientError:
                continue
        raise _error(web.HTTPServiceUnavailable, "no healthy pod")

    async def handle_health(self, request: web.Request) -> web.Response:
        healthy = self.registry.candidates(DECODE_ROLES)
        return web.json_response({"healthy_pods": healthy}, status=200 if healthy else 503)

    async def handle_metrics(self, request: web.Request) -> web.Response:
        self.metrics.refresh(self.registry, self.index, self.shared)
        self.metrics.queue_depth.set(len(self.queue) if self.queue is not None else 0)
        return web.Response(body=self.metrics.render(), content_type="text/plain")

    def close(self) -> None:
        if self._audit is not None:
            self._audit.close()
        if self.index is not None:
            self.index.close()
        if self.shared is not None:
            self.shared.close()


class _ClientLeft(Exception):
    """Our client closed its connection while its answer was being written."""


class _NotStarted(Exception):
    """The pod could not be reached; nothing was sent to the client."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


async def _read_json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except web.HTTPRequestEntityTooLarge as exc:
        raise _JSONError(exc.status, _error_payload(type(exc), exc.text or "")) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise _error(web.HTTPBadRequest, f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _error(web.HTTPBadRequest, "the body must be a JSON object")
    return body


def _error(
    kind: type[web.HTTPException], message: str, headers: Mapping[str, str] | None = None
) -> web.HTTPException:
    """An OpenAI-style error answer."""
    return kind(
        text=json.dumps(_error_payload(kind, message)),
        content_type="application/json",
        headers=headers,
    )


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    return value if isinstance(value, int) else None


def _error_payload(kind: type[web.HTTPException], message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind.__name__, "code": kind.status_code}}


class _JSONError(web.HTTPException):
    """An error answer with a JSON body and any status (a pod's, passed through)."""

    status_code = 502

    def __init__(self, status: int, answer: Any) -> None:
        super().__init__(text=json.dumps(answer), content_type="application/json")
        self.set_status(status)


def _upstream_error(status: int, answer: Any) -> web.HTTPException:
    return _JSONError(status, answer)


# Seconds an idle pooled connection to a pod is kept: below the pods' own keep-alive timeout
# (uvicorn: 5 s), so the router drops an idle connection before the pod does, instead of
# sending a request on one the pod is closing.
UPSTREAM_KEEPALIVE_S = 3.0


def upstream_session(request_timeout_s: float) -> aiohttp.ClientSession:
    """The router's one client session to its pods. No connection limit: aiohttp's default (100)
    would hold the 101st concurrent request back inside the router, unseen by the pods' queues
    and the router's own admission; concurrency is bounded by the clients and by admission."""
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=UPSTREAM_KEEPALIVE_S)
    timeout = aiohttp.ClientTimeout(total=request_timeout_s)
    return aiohttp.ClientSession(connector=connector, timeout=timeout)


def make_app(router: Router) -> web.Application:
    app = web.Application(client_max_size=router.config.max_body_bytes)
    app.router.add_post("/v1/completions", router.handle_generate)
    app.router.add_post("/v1/chat/completions", router.handle_generate)
    app.router.add_get("/v1/models", router.handle_models)
    app.router.add_get("/health", router.handle_health)
    app.router.add_get("/metrics", router.handle_metrics)

    async def on_startup(app: web.Application) -> None:
        router.session = upstream_session(router.config.request_timeout_s)
        await router.registry.start(router.session)

    async def on_cleanup(app: web.Application) -> None:
        if router._ticker is not None:
            router._ticker.cancel()
        await router.registry.stop()
        if router.session is not None:
            await router.session.close()
        router.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app
