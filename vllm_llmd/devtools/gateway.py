"""A stand-in for Envoy with the Gateway API Inference Extension's ext_proc filter, before the
endpoint picker (`vllm-llmd-router --epp-port`, router/epp.py): no Envoy binary runs here, so
benchmarks and tests drive real traffic through this. Per client request, one ext_proc v3
`Process` stream (one gRPC channel, reused), spoken as Envoy's filter speaks it:

- request headers: `:method`, `:path`, `:authority`, `:scheme` and the client's headers as
  `raw_value` bytes (`end_of_stream` without a body; `protocol_config` names the body modes);
  then the body in one chunk. BUFFERED (the default): each message waits for its answer.
  FULL_DUPLEX_STREAMED (`full_duplex`, the extension's gateways): all is sent at once, the
  routing answer comes to the headers, then the picker sends the body back in chunks;
- the picker's header (set / remove, Envoy's default rules) and body mutations are applied;
  an immediate_response is the client's answer; else the request goes to `http://IP:PORT` +
  path, the first endpoint named (`envoy.lb` metadata, else the header; `IP:PORT,...`),
  then the next when connecting fails (Envoy with a `connect-failure` retry policy);
- the pod's answer: its headers (`:status`, ...; `envoy.lb` says who served it), then each
  body chunk as it comes and an empty one with end_of_stream: STREAMED (each chunk waits for
  its answer) with BUFFERED requests, else FULL_DUPLEX_STREAMED (the picker's chunks go on);
- a client that goes away cancels the stream (the picker counts a 499).

It does NOT do: retries once a pod took the request (a reset, a 5xx), TLS (plain HTTP to
pods, plain gRPC to the picker), load balancing of its own (no destination: 503), trailers,
`mode_override`, message timeouts.
CLI: `python -m vllm_llmd.devtools.gateway --epp HOST:PORT [--port N] [--full-duplex]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import grpc
from aiohttp import web
from envoy.service.ext_proc.v3.external_processor_pb2_grpc import ExternalProcessorStub
from multidict import CIMultiDict
from yarl import URL

from vllm_llmd.devtools import gateway_wire as wire
from vllm_llmd.devtools.server import free_port
from vllm_llmd.router.epp_wire import DESTINATION_NAMESPACE, SERVED_KEY

logger = logging.getLogger(__name__)


class _Refused(Exception):
    """The picker answered with an immediate_response (the exception's argument)."""


class _Stream:
    """One ext_proc `Process` call: one request's exchange with the picker."""

    def __init__(self, call: Any) -> None:
        self.call = call

    async def read(self) -> Any:
        answer = await self.call.read()
        if answer is grpc.aio.EOF:
            raise ConnectionError("the endpoint picker ended the stream early")
        if answer.HasField("immediate_response"):
            raise _Refused(answer.immediate_response)
        return answer

    async def ask(self, message: Any) -> Any:
        await self.call.write(message)
        return await self.read()

    async def sent_back(self, kind: str) -> AsyncIterator[bytes]:
        """FULL_DUPLEX_STREAMED: the body's chunks as the picker sends them back."""
        while True:
            piece = getattr(await self.read(), kind).response.body_mutation.streamed_response
            yield piece.body
            if piece.end_of_stream:
                return

    async def send_all(self, chunks: AsyncIterator[bytes]) -> None:
        """FULL_DUPLEX_STREAMED: the answer's chunks go as they come, not waiting."""
        try:
            async for chunk in chunks:
                await self.call.write(wire.message("response_body", body=chunk))
            await self.call.write(wire.message("response_body", body=b"", end_of_stream=True))
        except BaseException:  # the pod failed mid-answer: so does the stream (and its reader)
            self.call.cancel()
            raise

    async def close(self) -> None:
        """Half-close, then wait for the picker to end the stream."""
        await self.call.done_writing()
        while await self.call.read() is not grpc.aio.EOF:
            pass


class EnvoyStandIn:
    """The gateway: `await start()` (its URL) ... `await stop()`, or `async with`."""

    def __init__(
        self, epp: str, *, host: str = "127.0.0.1", port: int = 0, full_duplex: bool = False
    ) -> None:
        self.epp, self.host, self.port, self.full_duplex = epp, host, port, full_duplex
        self.url = ""
        self._runner: web.AppRunner | None = None  # the rest is made by start()
        self._session: aiohttp.ClientSession
        self._channel: Any
        self._stub: Any

    async def start(self) -> str:
        self._channel = grpc.aio.insecure_channel(self.epp)
        self._stub = ExternalProcessorStub(self._channel)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            connector=aiohttp.TCPConnector(limit=1024),  # Envoy's default max connections
            auto_decompress=False,
        )
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # a client that goes away cancels its handler, as Envoy resets the filter chain
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        port = self.port or free_port(self.host)
        await web.TCPSite(self._runner, self.host, port).start()
        self.url = f"http://{self.host}:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            await self._session.close()
            await self._channel.close()

    async def __aenter__(self) -> EnvoyStandIn:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers: wire.Headers = CIMultiDict(
            [(":method", request.method), (":path", request.raw_path)]
        )
        headers.extend([(":authority", request.host), (":scheme", request.scheme)])
        headers.extend((k.lower(), v) for k, v in request.headers.items())
        wire.drop(headers, wire.HOP_BY_HOP)
        headers.setdefault("x-request-id", str(uuid.uuid4()))  # as Envoy makes one
        stream = _Stream(self._stub.Process())
        try:
            destinations, body = await self._route(stream, headers, body)
            return await self._forward(request, stream, headers, destinations, body)
        except wire.BadMutation as bad:
            stream.call.cancel()
            logger.error("%s", bad)
            return web.Response(status=502, text=f"Envoy stand-in: {bad}")
        except _Refused as refused:  # the picker ended the stream itself
            reply, reply_headers = refused.args[0], CIMultiDict[str]()
            wire.mutate(reply_headers, reply.headers)
            return web.Response(status=reply.status.code, body=reply.body, headers=reply_headers)
        except BaseException:  # the client left (cancelled), or the picker or pod failed
            stream.call.cancel()
            raise

    async def _route(
        self, stream: _Stream, headers: wire.Headers, body: bytes
    ) -> tuple[list[str], bytes]:
        """Send the request to the picker: (the destinations it names, the body to forward)."""
        first = wire.message("request_headers", items=headers.items(), end_of_stream=not body)
        first.protocol_config.request_body_mode = (
            wire.FULL_DUPLEX if self.full_duplex else wire.BUFFERED
        )
        first.protocol_config.response_body_mode = (
            wire.FULL_DUPLEX if self.full_duplex else wire.STREAMED
        )
        chunk = wire.message("request_body", body=body, end_of_stream=True)
        if not self.full_duplex:
            answers = [await stream.ask(first)]
            if body:
                answers.append(await stream.ask(chunk))
                body = wire.mutated(body, wire.common(answers[-1]))
        else:
            for message in (first, chunk) if body else (first,):
                await stream.call.write(message)
            answers = [await stream.read()]  # to the headers, once the body is whole
            if body:
                body = b"".join([piece async for piece in stream.sent_back("request_body")])
        for answer in answers:
            wire.mutate(headers, wire.common(answer).header_mutation)
        if headers.get("content-length", str(len(body))) != str(len(body)):
            # Envoy would send this: the pod would wait for bytes that never come
            length = headers["content-length"]
            raise wire.BadMutation(f"the picker left content-length {length} on {len(body)} bytes")
        return wire.destinations(answers, headers), body

    async def _forward(
        self,
        request: web.Request,
        stream: _Stream,
        headers: wire.Headers,
        destinations: list[str],
        body: bytes,
    ) -> web.StreamResponse:
        """Send the request to its pod and relay the answer, through the picker."""
        if not destinations:  # Envoy's local replies pass the filter too
            return await self._answer(request, stream, None, 503, {}, b"no healthy upstream")
        upstream = [
            (k, v) for k, v in headers.items() if k[0] != ":" and k not in wire.NOT_FORWARDED
        ]
        for destination in destinations:
            url = URL(f"http://{destination}{headers[':path']}", encoded=True)
            try:
                pod = await self._session.request(
                    request.method, url, headers=upstream, data=body or None, allow_redirects=False
                )
            except aiohttp.ClientConnectorError as exc:  # the pod never saw it: the next one
                logger.warning("%s: %s", url, exc)
                continue
            except aiohttp.ClientError as exc:  # it may have seen it: not retried
                logger.warning("%s: %s", url, exc)
                break
            async with pod:
                empty = pod.status in (204, 304) or request.method == "HEAD"
                chunks = None if empty or pod.content_length == 0 else pod.content.iter_any()
                return await self._answer(
                    request, stream, destination, pod.status, pod.headers, chunks
                )
        failed = b"upstream connect error or disconnect/reset before headers"
        return await self._answer(request, stream, None, 503, {}, failed)

    async def _answer(
        self,
        request: web.Request,
        stream: _Stream,
        served: str | None,
        status: int,
        pod_headers: Any,
        chunks: AsyncIterator[bytes] | bytes | None,
    ) -> web.StreamResponse:
        """Relay the answer (its chunks; bytes: a local reply; None: no body) through the
        picker to the client."""
        headers: wire.Headers = CIMultiDict([(":status", str(status))])
        headers.extend((k.lower(), v) for k, v in pod_headers.items())
        wire.drop(headers, wire.HOP_BY_HOP)
        if isinstance(chunks, bytes):
            headers.add("content-type", "text/plain")
            chunks = _once(chunks)
        message = wire.message(
            "response_headers", items=headers.items(), end_of_stream=chunks is None
        )
        if served is not None:
            metadata = message.metadata_context.filter_metadata[DESTINATION_NAMESPACE]
            metadata.update({SERVED_KEY: served})
        await stream.call.write(message)
        sender = None
        if self.full_duplex and chunks is not None:
            sender = asyncio.create_task(stream.send_all(chunks))
        try:
            wire.mutate(headers, (await stream.read()).response_headers.response.header_mutation)
            client = web.StreamResponse(status=int(headers.popone(":status")))
            client.headers.extend((k, v) for k, v in headers.items() if k not in wire.NOT_FORWARDED)
            await client.prepare(request)
            if sender is not None:  # the picker owns the body: what it sends goes on
                async for piece in stream.sent_back("response_body"):
                    await client.write(piece)
                await sender
            elif chunks is not None:
                async for chunk in chunks:
                    answer = await stream.ask(wire.message("response_body", body=chunk))
                    await client.write(wire.mutated(chunk, wire.common(answer)))
                end = wire.message("response_body", body=b"", end_of_stream=True)
                await client.write(wire.mutated(b"", wire.common(await stream.ask(end))))
        finally:
            if sender is not None:
                sender.cancel()
        await client.write_eof()
        await stream.close()
        return client


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def _stopped(gateway: EnvoyStandIn) -> None:
    """Stop the gateway and end what is left on its loop (as asyncio.run does)."""
    await gateway.stop()
    left = asyncio.all_tasks() - {asyncio.current_task()}
    for task in left:
        task.cancel()
    await asyncio.gather(*left, return_exceptions=True)


@contextlib.contextmanager
def running_gateway(epp_port: int, *, full_duplex: bool = False) -> Iterator[str]:
    """A stand-in before the picker on 127.0.0.1:epp_port, on an event loop of its own in a
    daemon thread (for sync code such as the benchmarks): yields its URL. grpc.aio serves one
    event loop at a time in a process: no other grpc.aio user may run beside it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="envoy-stand-in", daemon=True)
    thread.start()
    gateway = EnvoyStandIn(f"127.0.0.1:{epp_port}", full_duplex=full_duplex)
    try:
        yield asyncio.run_coroutine_threadsafe(gateway.start(), loop).result(timeout=30)
    finally:
        asyncio.run_coroutine_threadsafe(_stopped(gateway), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


async def _serve(gateway: EnvoyStandIn) -> None:
    stopped = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    print(f"Envoy stand-in on {await gateway.start()}, picker {gateway.epp}", flush=True)
    try:
        await stopped.wait()
    finally:
        await gateway.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="An Envoy stand-in before the endpoint picker")
    parser.add_argument("--epp", required=True, help="the endpoint picker's HOST:PORT")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    parser.add_argument("--full-duplex", action="store_true", help="default: BUFFERED requests")
    args = parser.parse_args(argv)
    gateway = EnvoyStandIn(args.epp, host=args.host, port=args.port, full_duplex=args.full_duplex)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(gateway))


if __name__ == "__main__":
    main()
