"""Sending a routed request to its pods: the P/D prefill step, then the decode pod's answer
streamed back (the next-best pod when one cannot be reached before anything was sent), and
what each answer teaches the pods' latency models."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
from aiohttp import web

from vllm_llmd.router.errors import error
from vllm_llmd.router.latency import LatencyModels, ServeMode
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


class Dispatcher:
    """Runs a `Route` against the pods through the router's client session."""

    def __init__(
        self, registry: PodRegistry, latency: LatencyModels, metrics: RouterMetrics
    ) -> None:
        self.registry = registry
        self.latency = latency
        self.metrics = metrics

    async def run_prefill(
        self, session: aiohttp.ClientSession, path: str, body: dict[str, Any], route: Route
    ) -> dict[str, Any]:
        """Run the prompt on the prefill pod; the decode request carries its KV params (the
        only kv_transfer_params a decode pod gets from this router, unless it trusts clients)."""
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
        sent = time.monotonic()
        try:
            async with await post(session, pod + path, prefill_body, headers) as resp:
                if is_redirect(resp.status):
                    raise redirect_error(pod, resp.status)
                answer = await resp.json(content_type=None)
                if resp.status != 200:
                    raise upstream_error(resp.status, answer)
            if route.prefill_shape is not None:  # one output token: its time is the TTFT
                ttft = time.monotonic() - sent
                self.latency.observe(pod, "prefill", route.prefill_shape, ttft, None)
                self.metrics.observed_ttft.labels(pod, "prefill").observe(ttft)
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            # The decode pod can still serve it alone, recomputing the prompt.
            self.registry.mark_unhealthy(pod, str(exc))
            logger.warning("prefill on %s failed (%s): decoding alone", pod, exc)
            return body
        params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
        return {**body, "kv_transfer_params": params} if params else body

    async def forward(
        self,
        session: aiohttp.ClientSession,
        request: web.Request,
        body: dict[str, Any],
        route: Route,
    ) -> web.StreamResponse:
        """The decode pod's answer, streamed; the next-best pod when one cannot be reached."""
        order = sorted(route.decode.scores, key=lambda p: -route.decode.scores[p])
        order.remove(route.decode.pod)
        last_error: Exception | None = None
        for pod in [route.decode.pod, *order]:
            try:
                with self.registry.sending(pod):
                    return await self._stream_from(session, pod, request, body, route)
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
            response, first_byte, num_events = await relay(upstream, request, pod, route.request_id)
        if upstream.status == 200 and first_byte is not None and pod == route.decode.pod:
            mode: ServeMode = "decode" if route.prefill is not None else "direct"
            self._observe(pod, mode, route, body, sent, first_byte, num_events)
        return response

    def _observe(
        self,
        pod: str,
        mode: ServeMode,
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
            relative_error = abs(route.prediction.ttft_s - ttft) / ttft
            self.metrics.ttft_error.labels(pod, mode).observe(relative_error)
        self.latency.observe(pod, mode, route.shape, ttft, tpot)
        model = self.latency.model(pod, mode)
        self.metrics.model_samples.labels(pod, mode).set(model.ttft.num_samples)
        self.metrics.observed_ttft.labels(pod, mode).observe(ttft)


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    return value if isinstance(value, int) else None
