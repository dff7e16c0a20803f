"""The router's HTTP face: an OpenAI-compatible proxy (aiohttp) over the pods.

For `/v1/completions` and `/v1/chat/completions`:

    validate (JSON, model, size, API key; a client's kv_transfer_params removed, its own chat
    template refused) -> tokenize + block hashes (off the event loop) -> index lookup per pod
    (off the event loop) -> admission (policy slo) -> `routing.decide_route` picks the decode
    pod (and, for a long uncached prompt with prefill pods, the prefill pod: it runs the prompt
    with max_tokens=1 and kv_transfer_params {"do_remote_decode": true}; its answer's
    kv_transfer_params go to the decode pod) -> forward, streaming the pod's bytes back;
    connection failures before any byte was sent retry on the next-best pod

A tokenization or index lookup that fails or takes too long routes the request by load alone
(counted in llmd_router_routing_fallbacks_total), never an error. The same X-Request-Id travels
to every pod of a request. Each decision is counted in /metrics and, with --audit-log, written
as one JSON line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Mapping
from functools import partial
from typing import Any

import aiohttp
from aiohttp import web

from vllm_llmd.events.model import MEDIUM_GPU
from vllm_llmd.log import ThrottledLog
from vllm_llmd.router.admission import Admission
from vllm_llmd.router.audit import AuditLog, audit_record
from vllm_llmd.router.client_body import (
    api_key_ok,
    read_json,
    refuse_request_template,
    strip_kv_transfer_params,
)
from vllm_llmd.router.config import RouterConfig
from vllm_llmd.router.dispatch import Dispatcher
from vllm_llmd.router.errors import error
from vllm_llmd.router.index import Index, IndexStats
from vllm_llmd.router.latency import LatencyModels
from vllm_llmd.router.metrics import RouterMetrics
from vllm_llmd.router.off_loop import OffLoop
from vllm_llmd.router.pods import PodRegistry
from vllm_llmd.router.predictive import SLOPlanner
from vllm_llmd.router.recent import RecentRoutes
from vllm_llmd.router.routing import (
    DECODE_ROLES,
    PREFILL_ROLES,
    Route,
    RoutingPolicy,
    decide_route,
)
from vllm_llmd.router.scoring import PodCache, PolicyName, ScoreInput, ScoringPolicy
from vllm_llmd.router.shared_view import (
    SharedTierView,
    SharedViewStats,
    extend_with_shared,
    extended,
)
from vllm_llmd.router.slo import Admitted, RequestClass, SLOHeaderError
from vllm_llmd.router.tokens import (
    PROVISIONAL_BLOCK_SIZE,
    TokenProcessor,
    UnsupportedRequestError,
)
from vllm_llmd.router.upstream import ClientLeft, is_redirect

logger = logging.getLogger(__name__)

# the requests metric's status for a request whose client disconnected first (nginx's 499)
CLIENT_CLOSED_STATUS = "499"
# threads for index and shared-tier calls (Redis round trips; a stalled Redis holds each for
# up to its socket timeout)
INDEX_WORKERS = 4

__all__ = ["Route", "Router"]


class Router:
    """Request handling; the aiohttp app is `app.make_app(router)`."""

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
        self._audit = (
            AuditLog(config.audit_log, on_failure=metrics.audit_failures.inc)
            if config.audit_log
            else None
        )
        self._tokenize = OffLoop(
            "llmd-tokenize", config.tokenize_workers, config.tokenize_timeout_s
        )
        self._index_calls = OffLoop("llmd-index", INDEX_WORKERS, config.index_timeout_s)
        # a tokenizer or index that keeps failing must not log once per request
        self._tokenize_log, self._index_log = ThrottledLog(logger), ThrottledLog(logger)
        # Every policy learns the pods' latency (exported as metrics); `slo` also routes on it.
        self.slo_config = config.slo_config()
        self.latency = LatencyModels(config.latency_min_samples)
        self.planner: SLOPlanner | None = None
        self.admission: Admission | None = None
        if config.policy == PolicyName.SLO.value:
            self.planner = SLOPlanner(
                self.latency,
                policy,
                config.scoring_config(),
                self._block_size(),
                self.slo_config.headroom,
            )
            self.admission = Admission(
                self.slo_config.max_queue,
                self.slo_config.queue_timeout_s,
                max(1, round(config.poll_interval_s)),
                metrics,
            )
        self.dispatch = Dispatcher(registry, self.latency, metrics)
        self.routing = RoutingPolicy(
            policy, self.planner, self.latency, self._block_size(), config.pd_threshold_tokens
        )

    def _block_size(self) -> int:
        """Tokens per hashed block: the tokenizer's (given, or taken from the first pod)."""
        if self.tokens is not None:
            return self.tokens.block_size
        return self.config.block_size or PROVISIONAL_BLOCK_SIZE  # no hashes: never used

    def _follow_block_size(self) -> None:
        """The routing policy converts hit blocks to tokens with the pods' block size, which
        the tokenizer may have taken from a pod since the last request."""
        block_size = self._block_size()
        if block_size != self.routing.block_size:
            self.routing = dataclasses.replace(self.routing, block_size=block_size)
            if self.planner is not None:
                self.planner.block_size = block_size

    # ---- requests ------------------------------------------------------------------------

    async def handle_generate(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        route_name = request.path
        try:
            self._check_api_key(request)
            body = self._checked_body(await read_json(request))
            request_class = self._classify(request.headers, body)
            hashes, num_tokens = await self._hashes(request.path, body)
            self._follow_block_size()
            caches = await self._lookup(hashes)
            admission: Admitted = "met"
            queued_s = 0.0
            if self.admission is not None:
                admissible = partial(self._admissible, hashes, caches, num_tokens, request_class)
                admission, queued_s = await self.admission.admit(request_class, admissible)
                if admission != "met":  # it waited: the pods' caches moved on
                    caches = await self._lookup(hashes)
            route = self._route(request.headers, hashes, caches, num_tokens, request_class)
            route.queued_s, route.admission = queued_s, admission
            self._record(route, body)
            assert self.session is not None
            if route.prefill is not None:
                body = await self.dispatch.run_prefill(self.session, request.path, body, route)
            response = await self.dispatch.forward(self.session, request, body, route)
        except web.HTTPException as exc:
            self.metrics.requests.labels(route_name, str(exc.status)).inc()
            raise
        except asyncio.CancelledError:  # the client left (cli.py: handler_cancellation)
            self.metrics.requests.labels(route_name, CLIENT_CLOSED_STATUS).inc()
            raise
        except ClientLeft:  # it left while we wrote, before its cancellation came
            self.metrics.requests.labels(route_name, CLIENT_CLOSED_STATUS).inc()
            # as a cancellation: aiohttp closes quietly (an exception would be a logged 500)
            raise asyncio.CancelledError from None
        finally:
            if self.admission is not None:
                self.admission.pump()  # a finished request may make room for a queued one
        self.metrics.requests.labels(route_name, str(response.status)).inc()
        self.metrics.latency.labels(route_name).observe(time.monotonic() - started)
        return response

    def _check_api_key(self, request: web.Request) -> None:
        key = self.config.api_key
        if key and not api_key_ok(request.headers.get("Authorization"), key):
            raise error(web.HTTPUnauthorized, "missing or wrong API key")

    def _checked_body(self, body: dict[str, Any]) -> dict[str, Any]:
        """The body as the router may forward it (see client_body)."""
        if not self.config.trust_client_kv_transfer_params:
            body, stripped = strip_kv_transfer_params(body)
            if stripped:
                self.metrics.stripped_kv_params.inc()
                logger.debug("removed a client's kv_transfer_params")
        if not self.config.trust_request_chat_template:
            refuse_request_template(body)
        return body

    def _classify(self, headers: Mapping[str, str], body: dict[str, Any]) -> RequestClass:
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise error(web.HTTPBadRequest, "the request has no 'model'")
        try:
            return self.slo_config.classify(headers, body["model"])
        except SLOHeaderError as exc:
            raise error(web.HTTPBadRequest, str(exc)) from None

    def _admissible(
        self,
        hashes: list[int],
        caches: Mapping[str, PodCache],
        num_tokens: int | None,
        request_class: RequestClass,
    ) -> bool:
        """A pod can take the request now: not all saturated, one predicted to meet its SLO."""
        assert self.planner is not None
        decode_pods = self.registry.candidates(DECODE_ROLES)
        if not decode_pods:
            return True  # _route answers 503
        request = ScoreInput(len(hashes), decode_pods, caches, self.registry.loads())
        if self.planner.all_saturated(request):
            return False
        # Only a miss that load causes is worth waiting for (see SLOChoice.meets_when_idle).
        return not self.planner.choose(request, num_tokens, request_class.slo).load_bound

    # ---- routing -------------------------------------------------------------------------

    def _route(
        self,
        headers: Mapping[str, str],
        hashes: list[int],
        caches: Mapping[str, PodCache],
        num_tokens: int | None,
        request_class: RequestClass,
    ) -> Route:
        chosen_prefill = self._prefill_from_headers(headers)
        decode_pods = self.registry.candidates(DECODE_ROLES)
        if not decode_pods:
            raise error(web.HTTPServiceUnavailable, "no healthy pod can serve this request")
        loads = self.registry.loads()
        route = decide_route(
            self.routing,
            headers.get("X-Request-Id") or str(uuid.uuid4()),
            len(hashes),
            num_tokens,
            request_class,
            decode_pods,
            self.registry.candidates(PREFILL_ROLES),
            caches,
            loads,
            chosen_prefill,
        )
        if self.recent is not None and hashes:
            for chosen in (route.decode, route.prefill):
                if chosen is not None and chosen.pod in loads:  # ours, not a header's
                    self.recent.record(chosen.pod, hashes)
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
            message = f"prefill target {url} is not in this router's allowlist"
            raise error(web.HTTPForbidden, message)
        return url

    async def _hashes(self, path: str, body: Mapping[str, Any]) -> tuple[list[int], int | None]:
        """The prompt's block hashes and token count, tokenized off the event loop; none (the
        request is routed by load) when it cannot be tokenized here or takes too long."""
        if self.tokens is None:
            return [], None
        try:
            tokenized = await self._tokenize.run(self.tokens.tokenize_request, path, body)
        except UnsupportedRequestError as exc:
            logger.debug("routing by load alone: %s", exc)
            return [], None
        except TimeoutError:
            self.metrics.routing_fallbacks.labels("tokenize_timeout").inc()
            self._tokenize_log.warning(
                "tokenizing a request took over %g s: routed by load alone",
                self._tokenize.timeout_s,
            )
            return [], None
        return list(tokenized.block_hashes), len(tokenized.token_ids)

    async def _lookup(self, hashes: list[int]) -> dict[str, PodCache]:
        """`_caches` off the event loop; none (route by load) when the index fails or stalls."""
        if self.index is None or not hashes:
            return {}
        try:
            caches = await self._index_calls.run(self._caches, hashes)
        except Exception as exc:  # Redis down or stalled, or a bug: never a failed request
            reason = "index_timeout" if isinstance(exc, TimeoutError) else "index_error"
            self.metrics.routing_fallbacks.labels(reason).inc()
            self._index_log.warning("index lookup failed (%r): routed by load alone", exc)
            return {}
        return caches

    def _caches(self, hashes: list[int]) -> dict[str, PodCache]:
        """Each verified pod's cached run of the prompt: the index, prefixes just routed there,
        then the shared tier. Blocking (Redis): call it through `_lookup`."""
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
        if self._audit is not None:
            self._audit.write(audit_record(route, body, self.config.audit_prompts))

    # ---- other endpoints -----------------------------------------------------------------

    async def handle_models(self, request: web.Request) -> web.Response:
        assert self.session is not None
        self._check_api_key(request)
        for pod in self.registry.candidates(DECODE_ROLES + PREFILL_ROLES):
            try:
                async with self.session.get(pod + "/v1/models", allow_redirects=False) as resp:
                    if is_redirect(resp.status):
                        continue
                    return web.json_response(await resp.json(), status=resp.status)
            except aiohttp.ClientError:
                continue
        raise error(web.HTTPServiceUnavailable, "no healthy pod")

    async def handle_health(self, request: web.Request) -> web.Response:
        healthy = self.registry.candidates(DECODE_ROLES)
        body = {"healthy_pods": healthy, "pods": self.registry.problems()}
        return web.json_response(body, status=200 if healthy else 503)

    async def handle_metrics(self, request: web.Request) -> web.Response:
        try:
            index_stats, shared_stats = await self._index_calls.run(self._store_stats)
        except Exception as exc:  # Redis down or stalled: the other metrics still answer
            logger.debug("index stats not read: %r", exc)
            index_stats, shared_stats = None, None
        self.metrics.refresh(self.registry, index_stats, shared_stats)
        queued = len(self.admission.queue) if self.admission is not None else 0
        self.metrics.queue_depth.set(queued)
        return web.Response(body=self.metrics.render(), content_type="text/plain")

    def _store_stats(self) -> tuple[IndexStats | None, SharedViewStats | None]:
        return (
            self.index.stats() if self.index is not None else None,
            self.shared.stats() if self.shared is not None else None,
        )

    def close(self) -> None:
        if self.admission is not None:
            self.admission.stop()
        self._tokenize.close()
        self._index_calls.close()
        if self._audit is not None:
            self._audit.close()
        if self.index is not None:
            self.index.close()
        if self.shared is not None:
            self.shared.close()
