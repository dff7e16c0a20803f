"""The router's HTTP face: an OpenAI-compatible proxy (aiohttp) over the pods.

For `/v1/completions` and `/v1/chat/completions`:

    validate (JSON, model, size, API key; a client's kv_transfer_params removed, its own chat
    template refused) -> the routing decision (`decision.Decider.decide`: tokenize, index
    lookup, admission, decode pod and perhaps prefill pod) -> for a P/D route the prefill pod
    runs the prompt with max_tokens=1 and kv_transfer_params {"do_remote_decode": true}; its
    answer's kv_transfer_params go to the decode pod -> forward, streaming the pod's bytes
    back; connection failures before any byte was sent retry on the next-best pod

The same X-Request-Id travels to every pod of a request. Each decision is counted in /metrics
and, with --audit-log, each routed request is written as one JSON line when its answer is
complete (router/audit.py). The router's endpoint picker (`epp.py`, --epp-port) takes the same
decisions for a gateway that forwards the requests itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import cached_property, partial

import aiohttp
from aiohttp import web

from vllm_llmd.router.client_body import read_json
from vllm_llmd.router.decision import Decider
from vllm_llmd.router.dispatch import Dispatcher
from vllm_llmd.router.errors import error
from vllm_llmd.router.index import IndexStats
from vllm_llmd.router.request_record import CLIENT_CLOSED_STATUS, RequestRecord
from vllm_llmd.router.routing import DECODE_ROLES, PREFILL_ROLES, Route
from vllm_llmd.router.shared_view import SharedViewStats
from vllm_llmd.router.upstream import ClientLeft, is_redirect

logger = logging.getLogger(__name__)

__all__ = ["Route", "Router"]


class Router(Decider):
    """Request handling; the aiohttp app is `app.make_app(router)`. The routing state and
    decision are the `Decider`'s, shared with the endpoint picker."""

    @cached_property
    def dispatch(self) -> Dispatcher:
        return Dispatcher(self.registry, self.latency, self.metrics)

    # ---- requests ------------------------------------------------------------------------

    async def handle_generate(self, request: web.Request) -> web.StreamResponse:
        record = RequestRecord(request.path, arrived=time.time(), started=time.monotonic())
        try:
            self.check_api_key(request.headers)
            body = self.checked_body(await read_json(request))
            record.body = body
            route = await self.decide(record, request.headers, body)
            assert self.session is not None
            if route.prefill is not None:
                body = await self.dispatch.run_prefill(
                    self.session, request.path, body, route, record.served
                )
            response = await self.dispatch.forward(
                self.session,
                request,
                body,
                route,
                record.served,
                partial(self.recorder.answered, record),
            )
        except web.HTTPException as exc:
            self.count(record, exc.status)
            self.recorder.failed(record, exc.status)
            raise
        except asyncio.CancelledError:  # the client left (cli.py: handler_cancellation)
            self.count(record, CLIENT_CLOSED_STATUS)
            self.recorder.failed(record)
            raise
        except ClientLeft:  # it left while we wrote, before its cancellation came
            self.count(record, CLIENT_CLOSED_STATUS)
            self.recorder.failed(record)
            # as a cancellation: aiohttp closes quietly (an exception would be a logged 500)
            raise asyncio.CancelledError from None
        finally:
            self.finished()  # a finished request may make room for a queued one
        self.count(record, response.status)
        self.metrics.latency.labels(record.path).observe(time.monotonic() - record.started)
        return response

    # ---- other endpoints -----------------------------------------------------------------

    async def handle_models(self, request: web.Request) -> web.Response:
        assert self.session is not None
        self.check_api_key(request.headers)
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
        healthy = self.serving_pods()
        body = {"healthy_pods": healthy, "pods": self.registry.problems()}
        return web.json_response(body, status=200 if healthy else 503)

    async def handle_metrics(self, request: web.Request) -> web.Response:
        try:
            index_stats, shared_stats = await self.prompts.index_calls.run(self._store_stats)
        except Exception as exc:  # Redis down or stalled: the other metrics still answer
            logger.debug("index stats not read: %r", exc)
            index_stats, shared_stats = None, None
        self.metrics.refresh(self.registry, index_stats, shared_stats)
        queued = len(self.admission.queue) if self.admission is not None else 0
        self.metrics.queue_depth.set(queued)
        self.metrics.pace_depth.set(len(self.pacer) if self.pacer is not None else 0)
        return web.Response(body=self.metrics.render(), content_type="text/plain")

    def _store_stats(self) -> tuple[IndexStats | None, SharedViewStats | None]:
        return (
            self.index.stats() if self.index is not None else None,
            self.shared.stats() if self.shared is not None else None,
        )
