"""The router as a Gateway API Inference Extension endpoint picker (EPP): an Envoy ext_proc v3
server (`envoy.service.ext_proc.v3.ExternalProcessor/Process`, grpc.aio) that tells the
gateway which pod serves each request, while the gateway itself forwards it.

One `Process` stream is one HTTP request. The picker reads its headers and body as the gateway
streams them, checks them as the proxy does (API key, JSON, client kv_transfer_params, chat
template), takes the proxy's own decision (`Decider.decide`: tokenize, index lookup, load, SLO
class, admission) and answers per the endpoint-picker protocol (`epp_wire`). How it answers
depends on the filter's request body mode (`protocol_config`, sent by Envoy on the stream's
first message):

- FULL_DUPLEX_STREAMED (the inference extension's gateways): the headers' answer waits for the
  whole body; then the routing answer to the headers, then the body sent back in chunks.
- BUFFERED (and any other mode, or none said): headers pass at once; the routing answer is
  the answer to the body's last chunk (Envoy holds the headers until then). In half-duplex
  STREAMED mode each chunk is passed on as it comes.
- A request without a body (end_of_stream on its headers): routed by load on its headers.

The routing answer names the picked decode pod first, then up to `--epp-fallbacks` others
(`fallback_pods`) that a gateway with retries tries in order when the first fails; each as
`IP:PORT`, the port `--epp-target-port` when the pool targets a routing sidecar there. No pod:
503; shed (policy slo, sheddable): 429 with Retry-After; a bad body: 400; all OpenAI-style
JSON in an immediate response. The decode pod's in-flight count holds until the
answer's end (the stream's), as the proxy's does while it relays, and the decision and answer
are counted and audited as the proxy's are (served by a fallback: counted to the pod the
gateway reports, while the in-flight count stays on the picked one).

The same gRPC server serves `grpc.health.v1.Health` (`epp_health`): ready as the proxy's
/health is, while a decode pod is healthy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    ProcessingRequest,
    ProcessingResponse,
)

from vllm_llmd.router.client_body import MAX_JSON_DEPTH, json_depth
from vllm_llmd.router.decision import Decider
from vllm_llmd.router.dispatch import AnswerTiming, learn_from_answer
from vllm_llmd.router.epp_health import HealthService, add_health_service
from vllm_llmd.router.epp_wire import (
    PREFILLER_HEADER,
    PREFILLER_URL_HEADER,
    Headers,
    endpoint_of,
    endpoint_subset,
    immediate,
    passed_on,
    picked,
    read_headers,
    response_headers_answer,
    served_endpoint,
    streamed,
)
from vllm_llmd.router.errors import error
from vllm_llmd.router.load import PodLoad
from vllm_llmd.router.pod_state import Sending
from vllm_llmd.router.prefill_headers import KV_SOURCE_HEADER
from vllm_llmd.router.request_record import CLIENT_CLOSED_STATUS, RequestRecord
from vllm_llmd.router.routing import DECODE_ROLES, Route
from vllm_llmd.router.scoring import Decision, load_key

logger = logging.getLogger(__name__)

FULL_DUPLEX = ProcessingMode.BodySendMode.FULL_DUPLEX_STREAMED
STREAMED = ProcessingMode.BodySendMode.STREAMED
NO_BODY = ProcessingMode.BodySendMode.NONE  # the body is not sent to the picker
# the requests metric's route for a path that is neither generate endpoint (bounded labels)
OTHER_ROUTE = "other"
GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")


@dataclass
class _Exchange:
    """One request's stream: what came so far and what was decided."""

    request_mode: int = ProcessingMode.BodySendMode.BUFFERED
    response_mode: int = ProcessingMode.BodySendMode.NONE
    headers: Headers = field(default_factory=lambda: Headers({}))
    allowed: set[str] | None = None  # pod ids in the gateway's endpoint subset
    body: bytearray = field(default_factory=bytearray)
    record: RequestRecord | None = None
    route: Route | None = None
    status: int | None = None  # of the pod's answer
    ended: bool = False  # the answer's end was seen (response body or trailers)
    # when the gateway was told where to send it (time.monotonic()), and the answer's SSE
    # events so far: what the latency models learn from, as from the proxy's answers
    picked_at: float | None = None
    num_events: int = 0
    # the request counted in flight to its pod (prefilling until the answer's first byte)
    sending: Sending | None = None


class EndpointPicker:
    """The ext_proc servicer (added to a grpc.aio server by `serve_epp`)."""

    def __init__(self, decider: Decider) -> None:
        self.decider = decider

    async def Process(  # the gRPC method's name
        self, requests: AsyncIterator[ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ProcessingResponse]:
        exchange = _Exchange()
        with contextlib.ExitStack() as in_flight:
            try:
                async for message in requests:
                    answers = await self._answer(exchange, message, in_flight)
                    for answer in answers:
                        yield answer
                    if answers and answers[-1].HasField("immediate_response"):
                        return
            finally:
                self._close(exchange)

    async def _answer(
        self, exchange: _Exchange, message: ProcessingRequest, in_flight: contextlib.ExitStack
    ) -> list[ProcessingResponse]:
        kind = message.WhichOneof("request")
        if message.HasField("protocol_config"):  # on the stream's first message
            exchange.request_mode = message.protocol_config.request_body_mode
            exchange.response_mode = message.protocol_config.response_body_mode
        if kind == "request_headers":
            exchange.headers = read_headers(message.request_headers)
            exchange.allowed = self._allowed(endpoint_subset(message))
            path = exchange.headers.get(":path", "").split("?")[0]
            exchange.record = RequestRecord(path, time.time(), time.monotonic())
            if message.request_headers.end_of_stream or exchange.request_mode == NO_BODY:
                return await self._pick(exchange, None, "request_headers", in_flight)
            if exchange.request_mode == FULL_DUPLEX:
                return []  # answered with the body's end
            return [passed_on("request_headers")]
        if kind == "request_body":
            exchange.body += message.request_body.body
            if len(exchange.body) > self.decider.config.max_body_bytes:
                limit = self.decider.config.max_body_bytes
                too_large = error(web.HTTPRequestEntityTooLarge, f"the body is over {limit} bytes")
                return [self._refused(exchange, too_large)]
            if not message.request_body.end_of_stream:
                return [] if exchange.request_mode == FULL_DUPLEX else [passed_on(kind)]
            return await self._pick(exchange, bytes(exchange.body), kind, in_flight)
        if kind == "request_trailers":
            answers = []
            if exchange.route is None:  # the body ended without end_of_stream (gRPC)
                raw = bytes(exchange.body)
                answers = await self._pick(exchange, raw, "request_body", in_flight)
                if answers[-1].HasField("immediate_response"):
                    return answers  # refused: nothing more is answered
            return [*answers, passed_on(kind)]
        return self._on_response(exchange, message, kind)

    def _on_response(
        self, exchange: _Exchange, message: ProcessingRequest, kind: str | None
    ) -> list[ProcessingResponse]:
        record = exchange.record
        if kind == "response_headers":
            status = read_headers(message.response_headers).get(":status", "")
            exchange.status = int(status) if status.isdigit() else None
            if record is not None:
                self._served(exchange, served_endpoint(message))
                if message.response_headers.end_of_stream:
                    self._end(exchange)
            return [response_headers_answer(self._answer_headers(exchange))]
        if kind == "response_body":
            if record is not None and record.served.first_byte is None:
                record.served.first_byte = time.monotonic()
            if exchange.sending is not None:
                exchange.sending.answering()
            exchange.num_events += message.response_body.body.count(b"data:")
            if message.response_body.end_of_stream:
                self._end(exchange)
            if exchange.response_mode == FULL_DUPLEX:  # we own the body: send it on
                body = message.response_body
                return streamed(body.body, body.end_of_stream, kind)
            return [passed_on(kind)]
        if kind == "response_trailers":
            self._end(exchange)
            return [passed_on(kind)]
        logger.debug("ext_proc message %s ignored", kind)
        return []

    async def _pick(
        self,
        exchange: _Exchange,
        raw: bytes | None,
        on: str,
        in_flight: contextlib.ExitStack,
    ) -> list[ProcessingResponse]:
        """Decide where the request goes; the answers that say so (or its refusal)."""
        record = exchange.record
        assert record is not None
        decider = self.decider
        # only this picker names the prefill pod or KV source: a client's header is not
        # decided on
        headers = exchange.headers.without(PREFILLER_HEADER, PREFILLER_URL_HEADER, KV_SOURCE_HEADER)
        changed = None  # the body as it must go on, when the checks changed it
        try:
            decider.check_api_key(headers)
            body = _parse_json(raw) if raw is not None else None
            checked = decider.checked_body(body) if body is not None else None
            if checked is not None and checked is not body:  # kv_transfer_params removed
                if exchange.request_mode == STREAMED:  # its chunks went on as they came
                    refusal = "kv_transfer_params cannot be removed from a streamed body"
                    raise error(web.HTTPBadRequest, refusal)
                changed = json.dumps(checked).encode()
            record.body = checked or {}
            route = await decider.decide(record, headers, checked, exchange.allowed)
        except web.HTTPException as exc:
            return [self._refused(exchange, exc)]
        exchange.route, exchange.picked_at = route, time.monotonic()
        prefill_tokens = route.shape.uncached_tokens if route.prefill is None else 0
        exchange.sending = in_flight.enter_context(
            decider.registry.sending(
                route.decode.pod, prefill_tokens, route.blocks, route.own_blocks
            )
        )
        prefill = endpoint_of(route.prefill.pod) if route.prefill is not None else None
        fallbacks = fallback_pods(route.decode, route.loads, decider.config.epp_fallbacks)
        # each endpoint once: pod ids may share one (http and https, or --epp-target-port)
        destinations = list(dict.fromkeys(map(self._endpoint, [route.decode.pod, *fallbacks])))
        if exchange.request_mode == FULL_DUPLEX:  # we own the body: send it on after
            sent = changed if changed is not None else raw
            length = len(sent) if sent is not None else None
            answers = [picked(destinations, prefill, "request_headers", content_length=length)]
            if sent is not None:
                answers += streamed(sent, True, on)
            return answers
        return [picked(destinations, prefill, on, changed)]

    def _refused(self, exchange: _Exchange, exc: web.HTTPException) -> ProcessingResponse:
        assert exchange.record is not None
        self.decider.recorder.failed(exchange.record, exc.status)
        exchange.status, exchange.ended = exc.status, True
        return immediate(exc.status, exc.text or "", {**exc.headers})

    def _endpoint(self, pod: str) -> str:
        """A decode pod's endpoint in the InferencePool: its `IP:PORT`, the port
        --epp-target-port when it has a routing sidecar there."""
        return endpoint_of(pod, self.decider.config.epp_target_port)

    def _pool(self) -> dict[str, str]:
        """The InferencePool's endpoints: the decode pods' (a prefill pod is no member: it
        gets no client request)."""
        pods = self.decider.registry.pods.items()
        return {self._endpoint(pod): pod for pod, state in pods if state.spec.role in DECODE_ROLES}

    def _allowed(self, subset: set[str] | None) -> set[str] | None:
        """The pod ids the gateway's endpoint subset (`IP:PORT`s of the pool) allows (None:
        all): the decode pods it names, and every prefill pod (outside the pool, so never
        named: a subset must not turn P/D off)."""
        if subset is None:
            return None
        decode = {pod for endpoint, pod in self._pool().items() if endpoint in subset}
        pods = self.decider.registry.pods.items()
        return decode | {pod for pod, state in pods if state.spec.role not in DECODE_ROLES}

    def _served(self, exchange: _Exchange, endpoint: str | None) -> None:
        """Record who answered: the gateway's report, else the picked decode pod."""
        record, route = exchange.record, exchange.route
        if record is None or route is None:
            return
        record.served.pod = self._pool().get(endpoint or "", route.decode.pod)
        record.served.status = exchange.status
        record.served.prefilled = route.prefill is not None  # named to the pod's sidecar

    def _answer_headers(self, exchange: _Exchange) -> dict[str, str]:
        """What the proxy adds to an answer: the pods that served it (a fallback, when the
        gateway reports one served it)."""
        route, record = exchange.route, exchange.record
        if route is None:
            return {}
        served = record.served.pod if record is not None else None
        headers = {"x-routed-to": served or route.decode.pod}
        if route.prefill is not None:
            headers["x-prefilled-by"] = route.prefill.pod
        return headers

    def _end(self, exchange: _Exchange) -> None:
        """The answer is whole: count who served it and write its audit line."""
        record = exchange.record
        if exchange.ended or record is None or exchange.route is None:
            return
        exchange.ended = True
        if record.served.pod is None:
            self._served(exchange, None)
        if record.served.status is None:
            record.served.status = exchange.status or 0
        self.decider.recorder.answered(record)
        self._learn(exchange)

    def _learn(self, exchange: _Exchange) -> None:
        """The decode pod's latency model learns from a 200 answer whose body passed here
        (the gateway sends response bodies: FULL_DUPLEX_STREAMED or STREAMED)."""
        record, route = exchange.record, exchange.route
        assert record is not None and route is not None
        served = record.served
        if (
            served.status != 200
            or served.pod != route.decode.pod
            or served.first_byte is None
            or exchange.picked_at is None
        ):
            return
        timing = AnswerTiming(
            exchange.picked_at, served.first_byte, time.monotonic(), exchange.num_events
        )
        learn_from_answer(self.decider.latency, self.decider.metrics, route, record.body, timing)

    def _close(self, exchange: _Exchange) -> None:
        """The stream ended: count the request once, however it ended."""
        record = exchange.record
        if record is None:
            return
        route_label = record.path if record.path in GENERATE_PATHS else OTHER_ROUTE
        if exchange.route is not None and not exchange.ended:  # the client or gateway left
            if exchange.status is None or exchange.response_mode != NO_BODY:
                # before the answer's headers, or with its body passing here but unfinished
                # (as the proxy counts a client that leaves mid-answer); without the body the
                # picker cannot tell a finished answer from one cut short: the headers' status
                exchange.status = CLIENT_CLOSED_STATUS
            self.decider.recorder.failed(record, exchange.status)
        status = exchange.status if exchange.status is not None else CLIENT_CLOSED_STATUS
        self.decider.metrics.requests.labels(route_label, str(status)).inc()
        if exchange.route is not None:
            elapsed = time.monotonic() - record.started
            self.decider.metrics.latency.labels(route_label).observe(elapsed)
            self.decider.finished()


def fallback_pods(decision: Decision, loads: Mapping[str, PodLoad], limit: int) -> list[str]:
    """Up to `limit` pods to try after the chosen one, best first: the policy's other
    candidates (healthy decode pods in the gateway's subset: those it scored) by its score,
    ties to the less loaded (the policies' own tie rule), then by id."""
    others = [pod for pod in decision.scores if pod != decision.pod]
    others.sort(key=lambda pod: (-decision.scores[pod], load_key(loads.get(pod) or PodLoad()), pod))
    return others[: max(0, limit)]


def _parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; 400 naming what is wrong (as client_body.read_json)."""
    too_deep = f"the body nests JSON deeper than {MAX_JSON_DEPTH} levels"
    try:
        body = json.loads(raw)
    except RecursionError:
        raise error(web.HTTPBadRequest, too_deep) from None
    except ValueError as exc:  # UnicodeDecodeError included
        raise error(web.HTTPBadRequest, f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise error(web.HTTPBadRequest, "the body must be a JSON object")
    if json_depth(body) > MAX_JSON_DEPTH:
        raise error(web.HTTPBadRequest, too_deep)
    return body


async def serve_epp(decider: Decider, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """Start the endpoint picker on host:port (0: a free port); (server, its port)."""
    server = grpc.aio.server()
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(
        EndpointPicker(decider), server
    )
    # ready as the proxy's /health is; Watch looks again at the pods' poll interval, when
    # their health can change
    ready = HealthService(lambda: bool(decider.serving_pods()), decider.config.poll_interval_s)
    add_health_service(server, ready)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"the endpoint picker cannot listen on {host}:{port}")
    await server.start()
    return server, bound
