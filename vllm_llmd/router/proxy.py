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
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from vllm_llmd.router.config import RouterConfig
from vllm_llmd.router.index import Index
from vllm_llmd.router.load import PodLoad
from vllm_llmd.router.metrics import RouterMetrics
from vllm_llmd.router.pods import PodRegistry
from vllm_llmd.router.scoring import Decision, PodCache, ScoreInput, ScoringPolicy
from vllm_llmd.router.tokens import TokenProcessor, UnsupportedRequestError

logger = logging.getLogger(__name__)

DECODE_ROLES = ("both", "decode")
PREFILL_ROLES = ("prefill",)
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
    ) -> None:
        self.config = config
        self.registry = registry
        self.index = index
        self.tokens = tokens
        self.policy = policy
        self.metrics = metrics
        self.session: aiohttp.ClientSession | None = None
        self._audit = open(config.audit_log, "a") if config.audit_log else None

    # ---- requests ------------------------------------------------------------------------

    async def handle_generate(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        route_name = request.path
        try:
            self._check_api_key(request)
            body = await _read_json(request)
            route = self._route(request.path, body, request.headers)
            if route.prefill is not None:
                body = await self._run_prefill(request.path, body, route)
            response = await self._forward(request, body, route)
        except web.HTTPException as exc:
            self.metrics.requests.labels(route_name, str(exc.status)).inc()
            raise
        self.metrics.requests.labels(route_name, str(response.status)).inc()
        self.metrics.latency.labels(route_name).observe(time.monotonic() - started)
        return response

    def _check_api_key(self, request: web.Request) -> None:
        if (
            self.config.api_key
            and request.headers.get("Authorization") != f"Bearer {self.config.api_key}"
        ):
            raise _error(web.HTTPUnauthorized, "missing or wrong API key")

    def _route(self, path: str, body: dict[str, Any], headers: Mapping[str, str]) -> Route:
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise _error(web.HTTPBadRequest, "the request has no 'model'")
        chosen_prefill = self._prefill_from_headers(headers)
        decode_pods = self.registry.candidates(DECODE_ROLES)
        if not decode_pods:
            raise _error(web.HTTPServiceUnavailable, "no healthy pod can serve this request")
        hashes, num_tokens = self._hashes(path, body)
        caches = self._caches(hashes)
        loads = self.registry.loads()
        decode = self.policy.choose(ScoreInput(len(hashes), decode_pods, caches, loads))
        prefill = None
        hit_tokens = decode.hit_blocks * self.config.block_size
        prefill_pods = self.registry.candidates(PREFILL_ROLES)
        uncached = (num_tokens or 0) - hit_tokens
        if chosen_prefill is not None:  # chosen upstream (llm-d's gateway): honour it
            prefill = Decision(chosen_prefill, "prefill chosen upstream (header)", {}, 0)
        elif prefill_pods and num_tokens is not None and uncached > self.config.pd_threshold_tokens:
            prefill = self.policy.choose(ScoreInput(len(hashes), prefill_pods, caches, loads))
        request_id = headers.get("X-Request-Id") or str(uuid.uuid4())
        route = Route(request_id, decode, prefill, num_tokens, hit_tokens, loads)
        self._record(route, body)
        return route

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
        return {pod: PodCache(hit.num_blocks, hit.tiers) for pod, hit in hits.items()}

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
        try:
            async with self.session.post(url, json=prefill_body, headers=headers) as resp:
                answer = await resp.json(content_type=None)
                if resp.status != 200:
                    raise _upstream_error(resp.status, answer)
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
            self.registry.pods[pod].in_flight += 1
            try:
                return await self._stream_from(pod, request, body, route.request_id)
            except _NotStarted as exc:  # nothing reached the client yet: try the next pod
                last_error = exc.cause
                self.registry.mark_unhealthy(pod, str(exc.cause))
                self.metrics.retries.inc()
            finally:
                self.registry.pods[pod].in_flight -= 1
        raise _error(web.HTTPBadGateway, f"no pod could be reached: {last_error}")

    async def _stream_from(
        self, pod: str, request: web.Request, body: dict[str, Any], request_id: str
    ) -> web.StreamResponse:
        assert self.session is not None
        headers = {"X-Request-Id": request_id}
        try:
            upstream = await self.session.post(pod + request.path, json=body, headers=headers)
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            raise _NotStarted(exc) from exc
        async with upstream:
            response = web.StreamResponse(status=upstream.status)
            for name, value in upstream.headers.items():
                if name.lower() not in _HOP_HEADERS:
                    response.headers[name] = value
            response.headers["X-Request-Id"] = request_id
            response.headers["X-Routed-To"] = pod
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

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
        self.metrics.refresh(self.registry, self.index)
        return web.Response(body=self.metrics.render(), content_type="text/plain")

    def close(self) -> None:
        if self._audit is not None:
            self._audit.close()


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


def _error(kind: type[web.HTTPException], message: str) -> web.HTTPException:
    """An OpenAI-style error answer."""
    return kind(text=json.dumps(_error_payload(kind, message)), content_type="application/json")


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


def make_app(router: Router) -> web.Application:
    app = web.Application(client_max_size=router.config.max_body_bytes)
    app.router.add_post("/v1/completions", router.handle_generate)
    app.router.add_post("/v1/chat/completions", router.handle_generate)
    app.router.add_get("/v1/models", router.handle_models)
    app.router.add_get("/health", router.handle_health)
    app.router.add_get("/metrics", router.handle_metrics)

    async def on_startup(app: web.Application) -> None:
        timeout = aiohttp.ClientTimeout(total=router.config.request_timeout_s)
        router.session = aiohttp.ClientSession(timeout=timeout)
        await router.registry.start(router.session)

    async def on_cleanup(app: web.Application) -> None:
        await router.registry.stop()
        if router.session is not None:
            await router.session.close()
        router.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app
