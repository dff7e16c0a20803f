"""Where a request goes, decided once for both of the router's faces: its OpenAI proxy
(`proxy.Router`) and its Gateway API endpoint picker (`epp.EndpointPicker`).

`Decider.decide` takes a request's headers and (checked) body and returns its `Route`:

    classify (SLO headers, model) -> tokenize + block hashes, index lookup per pod (both off
    the event loop: `prompt_lookup.PromptLookup`) -> admission (policy slo) -> prefill pacing
    (`pacing.PrefillPacer`: a long uncached prompt waits while another is ahead at its pod) ->
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

from vllm_llmd.router.admission import Admission, judge
from vllm_llmd.router.audit import AuditLog
from vllm_llmd.router.client_body import (
    answer_tokens,
    api_key_ok,
    refuse_request_template,
    strip_kv_transfer_params,
)
from vllm_llmd.router.config import Role, RouterConfig
from vllm_llmd.router.errors import error
from vllm_llmd.router.index import Index
from vllm_llmd.router.latency import LatencyModels
from vllm_llmd.router.load import PodLoad
from vllm_llmd.router.metrics import RouterMetrics
from vllm_llmd.router.pacing import PrefillPacer, paced, paced_pods
from vllm_llmd.router.pod_state import count_own_blocks, pods_without_room
from vllm_llmd.router.pods import PodRegistry
from vllm_llmd.router.predictive import SLOPlanner
from vllm_llmd.router.prefill_headers import prefill_target
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
        # round robin is the plain rotation it is named for: it never waits
        self.pacer: PrefillPacer | None = None
        if config.prefill_pace_tokens and config.policy != PolicyName.ROUND_ROBIN.value:
            self.pacer = PrefillPacer()
            registry.on_answering = self.pacer.pump
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
        if self.pacer is not None:
            may_go = partial(
                self._may_go, headers, hashes, own_blocks, looked_up, num_tokens, allowed
            )
            # routed with no await after the wait (PrefillPacer.wait): on the caches looked up
            # before it, with the prefixes routed since (recent routes)
            paced_s = await self.pacer.wait(partial(may_go, request_class.within(queued_s)))
            if paced_s:
                self.metrics.pace_wait.observe(paced_s)
                queued_s += paced_s
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
        """A routed request ended: a queued one may fit now (policy slo), a paced one go."""
        if self.admission is not None:
            self.admission.pump()
        if self.pacer is not None:
            self.pacer.pump()

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
        """Admit the request now, let it wait, or refuse it, after `waited_s` in the queue
        (`admission.judge`)."""
        assert self.planner is not None
        if request_class.plain:
            return "admit"
        decode_pods = self._candidates(DECODE_ROLES, allowed)
        if not decode_pods:
            return "admit"  # _route answers 503
        loads = self.registry.loads()
        full = self._without_room(loads, hashes, own_blocks)
        caches = self.prompts.now(looked_up, hashes)
        request = ScoreInput(len(hashes), decode_pods, caches, loads, full, self.config.kv_room)
        return judge(self.planner, request, num_tokens, request_class, waited_s)

    def _may_go(
        self,
        headers: Mapping[str, str],
        hashes: list[int],
        own_blocks: int,
        looked_up: Mapping[str, PodCache] | None,
        num_tokens: int | None,
        allowed: Collection[str] | None,
        request_class: RequestClass,
    ) -> bool:
        """The request's route now would not be `paced` (a refusal goes: `_route` answers)."""
        caches = self.prompts.now(looked_up, hashes)
        try:
            route = self._choose(
                headers, hashes, own_blocks, caches, num_tokens, request_class, allowed
            )
        except web.HTTPException:
            return True
        return not paced(route, route.loads, self.config.prefill_pace_tokens)

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
        """The request's route, its prefix counted at its pods until their events say."""
        route = self._choose(
            headers, hashes, own_blocks, caches, num_tokens, request_class, allowed
        )
        ours = self.registry.pods
        for chosen in (route.decode, route.prefill):
            if chosen is not None and chosen.pod in ours:  # ours, not a header's
                self.prompts.routed(chosen.pod, hashes)
        return route

    def _choose(
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
        return decide_route(
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
            self._without_room(loads, hashes, own_blocks) | self._paced(loads, caches, num_tokens),
        )

    def _paced(
        self, loads: Mapping[str, PodLoad], caches: Mapping[str, PodCache], num_tokens: int | None
    ) -> frozenset[str]:
        """The pods where the prompt would wait for room (prefill pacing on): saturated for it."""
        if self.pacer is None:
            return frozenset()
        pace = self.config.prefill_pace_tokens
        return paced_pods(loads, caches, num_tokens, self._block_size(), pace)

    def _own_blocks(
        self, num_blocks: int, num_tokens: int | None, body: Mapping[str, Any] | None
    ) -> int:
        """KV blocks the request needs besides its prompt's full ones: the partial block and
        the answer (its max_tokens; none said: only the prompt is counted)."""
        if num_tokens is None:
            return 0
        answer = answer_tokens(body) if body is not None else 0
        return count_own_blocks(num_blocks, num_tokens, answer, self._block_size())

    def _without_room(
        self, loads: Mapping[str, PodLoad], hashes: list[int], own_blocks: int
    ) -> frozenset[str]:
        """The pods whose KV cache has no room for the request now (`pods_without_room`)."""
        if not self.config.kv_room:
            return frozenset()
        return pods_without_room(loads, self.registry.pods, hashes, own_blocks)

    def _prefill_from_headers(self, headers: Mapping[str, str]) -> str | None:
        """The prefill target (or KV source) an upstream gateway named, if allowed (else
        403): `prefill_headers.prefill_target`."""
        return prefill_target(
            headers,
            self.registry.pods,
            self.config.pull_from_holders,
            self.config.prefill_allowlist,
        )

    def close(self) -> None:
        if self.admission is not None:
            self.admission.stop()
        if self.pacer is not None:
            self.pacer.stop()
        self.prompts.close()
        if self.recorder.audit is not None:
            self.recorder.audit.close()
