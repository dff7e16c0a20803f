"""Where a request goes, decided once for both of the router's faces: its OpenAI proxy
(`proxy.Router`) and its Gateway API endpoint picker (`epp.EndpointPicker`).

`Decider.decide` takes a request's headers and (checked) body and returns its `Route`:

    classify (SLO headers, model) -> tokenize + block hashes, index lookup per pod (both off
    the event loop: `prompt_lookup.PromptLookup`) -> admission (policy slo) ->
    `routing.decide_route` picks the decode pod (and, for a long uncached prompt with prefill
    pods, the prefill pod)

A refusal is an OpenAI-style `web.HTTPException` (400 bad header or body, 403 prefill target
not allowed, 429 shed, 503 no pod or queue full), which the proxy answers as is and the EPP
turns into an immediate response. A tokenization or index lookup that fails or takes too long
routes the request by load alone (counted in llmd:router_routing_fallbacks_total), never an
error. Each decision is counted in /metrics as it is taken (`RequestRecorder.decided`).
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Collection, Mapping
from functools import partial
from typing import Any

import aiohttp
from aiohttp import web

from vllm_llmd.router.admission import Admission
from vllm_llmd.router.audit import AuditLog
from vllm_llmd.router.client_body import (
    api_key_ok,
    refuse_request_template,
    strip_kv_transfer_params,
)
from vllm_llmd.router.config import Role, RouterConfig
from vllm_llmd.router.errors import error
from vllm_llmd.router.index import Index
from vllm_llmd.router.latency import LatencyModels, RequestShape
from vllm_llmd.router.load import PodLoad
from vllm_llmd.router.metrics import RouterMetrics
from vllm_llmd.router.pod_state import count_own_blocks, pods_without_room
from vllm_llmd.router.pods import PodRegistry
from vllm_llmd.router.predictive import SLOPlanner
from vllm_llmd.router.prompt_lookup import PromptLookup
from vllm_llmd.router.replication import HotPrefixes, Replicator
from vllm_llmd.router.request_record import RequestRecord, RequestRecorder
from vllm_llmd.router.routing import (
    DECODE_ROLES,
    PREFILL_ROLES,
    Route,
    RoutingPolicy,
    decide_route,
)
from vllm_llmd.router.scoring import PodCache, PolicyName, ScoreInput, ScoringPolicy
from vllm_llmd.router.shared_view import SharedTierView
from vllm_llmd.router.slo import Admitted, RequestClass, SLOHeaderError, Verdict
from vllm_llmd.router.tokens import (
    PROVISIONAL_BLOCK_SIZE,
    TokenProcessor,
)

logger = logging.getLogger(__name__)

# llm-d's header naming a pod that holds the prompt's KV (HOST:PORT): --pull-from-holders
KV_SOURCE_HEADER = "x-kv-cache-source-host-port"


class Decider:
    """The routing state (index, loads, latency models, admission queue) and the decision."""

    # the router's one client session to its pods, the app's (opened and closed with it:
    # `app.make_app`); also what hot-prefix copies are sent through
    session: aiohttp.ClientSession | None = None

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
        self.prompts = PromptLookup(config, registry, index, tokens, metrics, shared)
        self.index, self.shared, self.tokens = index, shared, tokens
        self.policy = policy
        self.metrics = metrics
        if registry.ingestor is not None:
            registry.ingestor.on_gap = metrics.event_gap
        audit = (
            AuditLog(config.audit_log, on_failure=metrics.audit_failures.inc)
            if config.audit_log
            else None
        )
        self.recorder = RequestRecorder(metrics, audit, config.policy, config.audit_prompts)
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
        self.routing = RoutingPolicy(
            policy,
            self.planner,
            self.latency,
            self._block_size(),
            config.pd_threshold_tokens,
            pull_from_holders=config.pull_from_holders,
            holder_max_waiting=2 * config.max_waiting,
            kv_room=config.kv_room,
        )
        self.replicator: Replicator | None = None
        if config.replicate_hot_prefixes and tokens is not None:
            hot = HotPrefixes(
                config.replicate_hot_prefixes,
                config.replicate_per_minute,
                config.pd_threshold_tokens,
            )
            self.replicator = Replicator(
                hot, tokens, self.prompts.tokenize_calls, metrics, self.prompts.recent
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

    # ---- checks of what a client sent ------------------------------------------------------

    def check_api_key(self, headers: Mapping[str, str]) -> None:
        """401 unless the request carries the router's --api-key (when it has one)."""
        key = self.config.api_key
        if key and not api_key_ok(headers.get("Authorization"), key):
            raise error(web.HTTPUnauthorized, "missing or wrong API key")

    def checked_body(self, body: dict[str, Any]) -> dict[str, Any]:
        """The body as the router may pass it on (see client_body)."""
        if not self.config.trust_client_kv_transfer_params:
            body, stripped = strip_kv_transfer_params(body)
            if stripped:
                self.metrics.stripped_kv_params.inc()
                logger.debug("removed a client's kv_transfer_params")
        if not self.config.trust_request_chat_template:
            refuse_request_template(body)
        return body

    def count(self, record: RequestRecord, status: int | str) -> None:
        """One request in llmd:router_requests_total, by route and answer status."""
        self.metrics.requests.labels(record.path, str(status)).inc()

    # ---- the decision ----------------------------------------------------------------------

    async def decide(
        self,
        record: RequestRecord,
        headers: Mapping[str, str],
        body: dict[str, Any] | None,
        allowed: Collection[str] | None = None,
    ) -> Route:
        """The request's route, counted as decided. `body` is the checked body (None: a
        request without one, routed by load); `allowed` limits the pods it may go to (the
        gateway's endpoint subset; None: any). Waits in the admission queue (policy slo);
        raises an OpenAI-style web.HTTPException when the request is refused."""
        request_class = self._classify(headers, body)
        prompts = self.prompts
        hashes, num_tokens = (
            await prompts.hashes(record.path, body) if body is not None else ([], None)
        )
        self._follow_block_size()
        looked_up = await prompts.lookup(hashes)
        own_blocks = self._own_blocks(len(hashes), num_tokens, body)
        admission: Admitted = "met"
        queued_s = 0.0
        if self.admission is not None:
            judge = partial(
                self._judge, hashes, own_blocks, looked_up, num_tokens, request_class, allowed
            )
            admission, queued_s = await self.admission.admit(request_class, judge)
            if admission != "met":  # it waited: the pods' caches moved on
                looked_up = await prompts.lookup(hashes)
        # chosen for what is left of its SLO; counted against its whole SLO from arrival
        left = request_class.within(queued_s)
        caches = prompts.now(looked_up, hashes)  # no await from here to the route's record
        route = self._route(headers, hashes, own_blocks, caches, num_tokens, left, allowed)
        route.request_class, route.queued_s, route.admission = request_class, queued_s, admission
        if self.config.kv_room:  # what it holds where it goes: counted only for this rule
            route.blocks, route.own_blocks = hashes, own_blocks
        self.recorder.decided(record, route)
        if self.replicator is not None and hashes and body is not None and self.session:
            self.replicator.observe(self.session, route, hashes, record.path, body)
        return route

    def serving_pods(self) -> list[str]:
        """The healthy decode pods: the router is ready (its /health, the picker's gRPC
        health) while there is one."""
        return self.registry.candidates(DECODE_ROLES)

    def finished(self) -> None:
        """A routed request ended: a queued one may fit now (policy slo)."""
        if self.admission is not None:
            self.admission.pump()

    def _classify(self, headers: Mapping[str, str], body: dict[str, Any] | None) -> RequestClass:
        model = None
        if body is not None:
            model = body.get("model")
            if not isinstance(model, str) or not model:
                raise error(web.HTTPBadRequest, "the request has no 'model'")
        try:
            return self.slo_config.classify(headers, model)
        except SLOHeaderError as exc:
            raise error(web.HTTPBadRequest, str(exc)) from None

    def _candidates(self, roles: tuple[Role, ...], allowed: Collection[str] | None) -> list[str]:
        pods = self.registry.candidates(roles)
        return pods if allowed is None else [pod for pod in pods if pod in allowed]

    def _judge(
        self,
        hashes: list[int],
        own_blocks: int,
        looked_up: Mapping[str, PodCache] | None,
        num_tokens: int | None,
        request_class: RequestClass,
        allowed: Collection[str] | None,
        waited_s: float,
    ) -> Verdict:
        """Admit the request now, let it wait, or refuse it, after `waited_s` in the queue.

        Admitted when a pod is predicted to meet what is left of its SLO; waits while only
        load stands in the way (not all pods saturated and an idle pod would meet it). A miss
        of its own (no pod, however idle, meets what is left) goes when its class is served
        late; else best effort, which also warms the cache for the requests that share its
        prefix, only on arrival, only on an idle pod (no prompt ahead of it, none decoding)
        and never on the last pod with no prompt ahead: a long cold prompt served on a busy
        pod holds up for seconds the requests that could meet their SLOs (past saturation,
        admitted while at most a quarter of their own TTFT was queued ahead, such prompts
        still took over half the pods' time), its prefill step stalls every answer decoding
        there past a TPOT SLO (a 2.5 s step in a 16-token answer adds 170 ms to each of its
        tokens), and with every pod on such prompts the next warm request has nowhere to go
        (cache-warming needs few of them: each pod keeps what its last one computed). Otherwise
        it is refused (429) at once. A plain request (no SLO, objective or fairness id) is
        admitted at once, as any policy would send it: only a queue of requests ahead holds it
        back."""
        assert self.planner is not None
        if request_class.plain:
            return "admit"
        left = request_class.within(waited_s)
        decode_pods = self._candidates(DECODE_ROLES, allowed)
        if not decode_pods:
            return "admit"  # _route answers 503
        loads = self.registry.loads()
        full = self._without_room(loads, hashes, own_blocks)
        caches = self.prompts.now(looked_up, hashes)
        request = ScoreInput(len(hashes), decode_pods, caches, loads, full, self.config.kv_room)
        if self.planner.all_saturated(request):
            return "wait"
        choice = self.planner.choose(request, num_tokens, left.slo)
        if choice.meets:
            return "admit"
        if choice.load_bound:
            return "wait"
        if request_class.served_late:
            return "admit"
        if waited_s == 0 and _idle(choice.shape) and _another_free(request, choice.decision.pod):
            return "admit"
        return "refuse"

    def _route(
        self,
        headers: Mapping[str, str],
        hashes: list[int],
        own_blocks: int,
        caches: Mapping[str, PodCache],
        num_tokens: int | None,
        request_class: RequestClass,
        allowed: Collection[str] | None = None,
    ) -> Route:
        chosen_prefill = self._prefill_from_headers(headers)
        decode_pods = self._candidates(DECODE_ROLES, allowed)
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
            self._candidates(PREFILL_ROLES, allowed),
            caches,
            loads,
            chosen_prefill,
            self._candidates(("both",), allowed) if self.config.pull_from_holders else (),
            self._without_room(loads, hashes, own_blocks),
        )
        for chosen in (route.decode, route.prefill):
            if chosen is not None and chosen.pod in loads:  # ours, not a header's
                self.prompts.routed(chosen.pod, hashes)
        return route

    def _own_blocks(
        self, num_blocks: int, num_tokens: int | None, body: Mapping[str, Any] | None
    ) -> int:
        """KV blocks the request needs besides its prompt's full ones: the partial block and
        the answer (its max_tokens; none said: only the prompt is counted)."""
        if num_tokens is None:
            return 0
        answer = 0
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key) if body is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                answer = value
                break
        return count_own_blocks(num_blocks, num_tokens, answer, self._block_size())

    def _without_room(
        self, loads: Mapping[str, PodLoad], hashes: list[int], own_blocks: int
    ) -> frozenset[str]:
        """The pods whose KV cache has no room for the request now (`pods_without_room`)."""
        if not self.config.kv_room:
            return frozenset()
        return pods_without_room(loads, self.registry.pods, hashes, own_blocks)

    def _prefill_from_headers(self, headers: Mapping[str, str]) -> str | None:
        """The prefill target an upstream gateway named, if allowed (else 403): llm-d's
        prefiller headers, or (with --pull-from-holders) its KV-source header, which names a
        pod of any role to pull the prompt's KV from."""
        roles: tuple[Role, ...] = PREFILL_ROLES
        host_port = headers.get("x-prefiller-host-port")
        url = f"http://{host_port.strip()}" if host_port else headers.get("x-prefiller-url")
        source = headers.get(KV_SOURCE_HEADER)
        if not url and source and self.config.pull_from_holders:
            url, roles = f"http://{source.strip()}", ("prefill", "both")
        if not url:
            return None
        url = url.strip().rstrip("/")
        allowed = {pid for pid, pod in self.registry.pods.items() if pod.spec.role in roles}
        allowed |= {
            f"http://{target.strip()}"
            for target in (self.config.prefill_allowlist or "").split(",")
            if target.strip()
        }
        if url not in allowed:
            message = f"prefill target {url} is not in this router's allowlist"
            raise error(web.HTTPForbidden, message)
        return url

    def close(self) -> None:
        if self.admission is not None:
            self.admission.stop()
        self.prompts.close()
        if self.recorder.audit is not None:
            self.recorder.audit.close()


def _idle(shape: RequestShape) -> bool:
    """No prompt ahead of the request at its pod, and none answering there."""
    return shape.ahead_tokens == 0 and shape.active == 0


def _another_free(request: ScoreInput, pod: str) -> bool:
    """Another candidate has no prompt ahead either (with one pod there is none to keep)."""
    others = [p for p in request.candidates if p != pod]
    return not others or any(request.load(p).prefill_tokens == 0 for p in others)
