"""Sending a routed request to its pods: the P/D prefill step, then the decode pod's answer
streamed back (the next-best pod when one cannot be reached before anything was sent), and
what each answer teaches the pods' latency models."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from vllm_llmd.router.errors import error
from vllm_llmd.router.latency import LatencyModels, ServeMode, relative_error
from vllm_llmd.router.metrics import RouterMetrics
from vllm_llmd.router.pods import PodRegistry
from vllm_llmd.router.routing import Route
from vllm_llmd.router.upstream import (
    NotStarted,
    is_redirect,
    post,
    redirect_error,
    relay,
    upstream_error,
)

logger = logging.getLogger(__name__)


@dataclass
class Served:
    """What became of a routed request, filled in as it is dispatched."""

    # the pod whose answer was relayed (the next-best after a failed connect), its status, and
    # when its first byte came (time.monotonic())
    pod: str | None = None
    status: int | None = None
    first_byte: float | None = None
    # the P/D prefill ran and the decode pod got its KV params (False: decoded alone), and
    # seconds from sending it to its answer (None: no prefill step answered)
    prefilled: bool = False
    prefill_s: float | None = None
    # its audit line is written (once: at the answer's end, or at its failure)
    recorded: bool = False


class Dispatcher:
    """Runs a `Route` against the pods through the router's client session."""

    def __init__(
        self, registry: PodRegistry, latency: LatencyModels, metrics: RouterMetrics
    ) -> None:
        self.registry = registry
        self.latency = latency
        self.metrics = metrics

    async def run_prefill(
        self,
        session: aiohttp.ClientSession,
        path: str,
        body: dict[str, Any],
        route: Route,
        served: Served | None = None,
    ) -> dict[str, Any]:
        """Run the prompt on the prefill pod; the decode request carries its KV params (the
        only kv_transfer_params a decode pod gets from this router, unless it trusts clients).
        `served.prefilled` says whether it does."""
        assert route.prefill is not None
        prefill_body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        prefill_body.update(
            max_tokens=1, stream=False, kv_transfer_params={"do_remote_decode": True}
        )
        if "max_completion_tokens" in prefill_body:
            prefill_body["max_completion_tokens"] = 1
        for key in ("min_tokens", "min_completion_tokens"):
            prefill_body.pop(key, None)
        pod = route.prefill.pod
        headers = {"X-Request-Id": route.request_id}
        # the prompt is work queued on the prefill pod until it answers: counted there at once,
        # as a decode pod's requests are, for the next request's features and load score
        shape = route.prefill_shape
        sent = time.monotonic()
        try:
            tokens = shape.uncached_tokens if shape else 0
            with self.registry.sending(pod, tokens, route.blocks, route.own_blocks):
                async with await post(session, pod + path, prefill_body, headers) as resp:
                    if is_redirect(resp.status):
                        raise redirect_error(pod, resp.status)
                    answer = await resp.json(content_type=None)
                    if resp.status != 200:
                        raise upstream_error(resp.status, answer)
            ttft = time.monotonic() - sent
            if served is not None:
                served.prefill_s = ttft
            if route.prefill_shape is not None:  # one output token: its time is the TTFT
                self.latency.observe(pod, "prefill", route.prefill_shape, ttft, None)
                self.metrics.observed_ttft.labels(pod, "prefill").observe(ttft)
                miss = self.latency.model(pod, "prefill").mean_residual_s
                self.metrics.ttft_mean_miss.labels(pod, "prefill").set(miss)
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            # The decode pod can still serve it alone, recomputing the prompt.
            self.registry.mark_unhealthy(pod, str(exc))
            logger.warning("prefill on %s failed (%s): decoding alone", pod, exc)
            return body
        params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
        if not params:
            return body
        if served is not None:
            served.prefilled = True
        # the decode pod gets the request now, its prompt by transfer and the work ahead of it
        # there that much further on: what its decode model learns from (as routing.pd_costs
        # predicts it)
        route.shape = route.shape.after_prefill(ttft)
        return {**body, "kv_transfer_params": params}

    async def forward(
        self,
        session: aiohttp.ClientSession,
        request: web.Request,
        body: dict[str, Any],
        route: Route,
        served: Served | None = None,
        on_answer: Callable[[], None] | None = None,
    ) -> web.StreamResponse:
        """The decode pod's answer, streamed; the next-best pod when one cannot be reached.

        `served` gets the answering pod, its status and first byte; `on_answer()` runs then,
        before the answer's end reaches the client (see upstream.relay)."""
        served = served if served is not None else Served()
        order = sorted(route.decode.scores, key=lambda p: -route.decode.scores[p])
        order.remove(route.decode.pod)
        last_error: Exception | None = None
        # the prefill work this request puts ahead of the pod's next ones (a P/D decode's
        # prompt comes by transfer)
        prefill_tokens = route.shape.uncached_tokens if route.prefill is None else 0
        for pod in [route.decode.pod, *order]:
            try:
                with self.registry.sending(
                    pod, prefill_tokens, route.blocks, route.own_blocks
                ) as sending:
                    return await self._stream_from(
                        session, pod, request, body, route, served, on_answer, sending.answering
                    )
            except NotStarted as exc:  # nothing reached the client yet: try the next pod
                last_error = exc.cause
                self.registry.mark_unhealthy(pod, str(exc.cause))
                self.metrics.retries.inc()
        raise error(web.HTTPBadGateway, f"no pod could be reached: {last_error}")

    async def _stream_from(
        self,
        session: aiohttp.ClientSession,
        pod: str,
        request: web.Request,
        body: dict[str, Any],
        route: Route,
        served: Served,
        on_answer: Callable[[], None] | None,
        on_first_byte: Callable[[], None],
    ) -> web.StreamResponse:
        headers = {"X-Request-Id": route.request_id}
        sent = time.monotonic()
        try:
            upstream = await post(session, pod + request.path, body, headers)
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            raise NotStarted(exc) from exc
        async with upstream:
            if is_redirect(upstream.status):
                raise redirect_error(pod, upstream.status)
            status = upstream.status

            def answered(first_byte: float | None) -> None:
                served.pod, served.status, served.first_byte = pod, status, first_byte
                if on_answer is not None:
                    on_answer()

            prefilled_by = route.prefill.pod if route.prefill and served.prefilled else None
            response, first_byte, num_events = await relay(
                upstream,
                request,
                pod,
                route.request_id,
                prefilled_by=prefilled_by,
                on_first_byte=on_first_byte,
                before_eof=answered,
            )
        if upstream.status == 200 and first_byte is not None and pod == route.decode.pod:
            answer = AnswerTiming(sent, first_byte, time.monotonic(), num_events)
            learn_from_answer(self.latency, self.metrics, route, body, answer)
        return response


@dataclass(frozen=True)
class AnswerTiming:
    """When a pod's 200 answer was asked for, began and ended (time.monotonic()), and its SSE
    events (`data:` lines)."""

    sent: float
    first_byte: float
    end: float
    num_events: int


def learn_from_answer(
    latency: LatencyModels,
    metrics: RouterMetrics,
    route: Route,
    body: Mapping[str, Any],
    answer: AnswerTiming,
) -> None:
    """Teach the decode pod's latency model what its answer took (the proxy's relay and the
    endpoint picker's view of a gateway's answer both call this).

    A streamed answer gives TTFT (its first chunk) and TPOT (the rest over the tokens: one SSE
    event per token, less the final [DONE]); an unstreamed one with one output token gives
    TTFT; other unstreamed answers say nothing separable and are not used.
    """
    pod = route.decode.pod
    mode: ServeMode = "decode" if route.prefill is not None else "direct"
    ttft = tpot = None
    if body.get("stream"):
        ttft = answer.first_byte - answer.sent
        num_tokens = answer.num_events - 1
        if num_tokens >= 2:
            tpot = (answer.end - answer.first_byte) / (num_tokens - 1)
    elif _max_tokens(body) == 1:
        ttft = answer.end - answer.sent
    if ttft is None:
        return
    # route.prediction is the decode pod computing alone: a P/D decode's TTFT (its prompt came
    # by transfer) is no observation of it
    error = relative_error(route.prediction if mode == "direct" else None, ttft)
    if error is not None:
        metrics.ttft_error.labels(pod, mode).observe(error)
    latency.observe(pod, mode, route.shape, ttft, tpot)
    model = latency.model(pod, mode)
    metrics.model_samples.labels(pod, mode).set(model.ttft.num_samples)
    metrics.ttft_mean_miss.labels(pod, mode).set(model.mean_residual_s)
    metrics.observed_ttft.labels(pod, mode).observe(ttft)


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    return value if isinstance(value, int) else None
