"""The endpoint picker's side of Envoy's ext_proc v3 messages (xds-protos' generated classes):
what it reads from a `ProcessingRequest` and the `ProcessingResponse`s it answers with, as the
Gateway API Inference Extension's endpoint-picker protocol defines them
(gateway-api-inference-extension, docs/proposals/004-endpoint-picker-protocol):

- the picked pod goes in the request header `x-gateway-destination-endpoint` AND in the
  dynamic metadata `envoy.lb` / `x-gateway-destination-endpoint`, with the same value: its
  `IP:PORT`, then the fallbacks' (`IP:PORT,IP:PORT,...`, protocol v0.4.0 on: "the proxy will
  go sequentially down the list" when retries are configured; the older single
  `x-gateway-destination-endpoint-fallback` key is not used);
- the gateway may limit the candidates in the request's filter metadata
  `envoy.lb.subset_hint` / `x-gateway-destination-endpoint-subset`;
- it reports the endpoint that served the request in `envoy.lb` /
  `x-gateway-destination-endpoint-served`;
- a request that cannot be served is an `ImmediateResponse` (503 no pod, 429 shed).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    BodyMutation,
    BodyResponse,
    CommonResponse,
    HeaderMutation,
    HeadersResponse,
    HttpHeaders,
    ImmediateResponse,
    ProcessingRequest,
    ProcessingResponse,
    StreamedBodyResponse,
)
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.json_format import MessageToDict
from google.protobuf.struct_pb2 import Struct

DESTINATION_NAMESPACE = "envoy.lb"
DESTINATION_KEY = "x-gateway-destination-endpoint"
SERVED_KEY = "x-gateway-destination-endpoint-served"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
# llm-d's routing sidecar (beside a decode vLLM) runs the prompt on this prefill pod first
PREFILLER_HEADER = "x-prefiller-host-port"
# its older name; removed from requests so a client cannot name a prefill pod
PREFILLER_URL_HEADER = "x-prefiller-url"
# Envoy limits a streamed body chunk to 64 KiB in some builds; stay below, as the
# inference extension's own picker does (62,000 bytes)
BODY_CHUNK_BYTES = 62_000


class Headers(Mapping[str, str]):
    """An HTTP/2 header map (Envoy's, lower-case names) read case-insensitively, as aiohttp's
    request headers are: the routing decision reads both."""

    def __init__(self, items: Mapping[str, str]) -> None:
        self._items = {name.lower(): value for name, value in items.items()}

    def __getitem__(self, name: str) -> str:
        return self._items[name.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def without(self, *names: str) -> Headers:
        return Headers({k: v for k, v in self._items.items() if k not in names})


def header_value(header: HeaderValue) -> str:
    """A header's value: Envoy sends `raw_value` bytes (`value` only in old versions)."""
    if header.raw_value:
        # bytes a client sent that are not UTF-8 stay distinct (as aiohttp keeps them)
        return str(header.raw_value.decode("utf-8", "surrogateescape"))
    return str(header.value)


def read_headers(headers: HttpHeaders) -> Headers:
    """The request's or response's headers; a repeated header's values joined by ','."""
    values: dict[str, str] = {}
    for header in headers.headers.headers:
        name = header.key.lower()
        value = header_value(header)
        values[name] = f"{values[name]},{value}" if name in values else value
    return Headers(values)


def _metadata(request: ProcessingRequest, namespace: str) -> dict[str, Any]:
    if not request.HasField("metadata_context"):
        return {}
    entry = request.metadata_context.filter_metadata.get(namespace)
    return MessageToDict(entry) if entry is not None else {}


def endpoint_subset(request: ProcessingRequest) -> set[str] | None:
    """The `IP:PORT`s the gateway lets the picker choose from (None: any pod). A list, or one
    comma-separated string (both occur: the inference extension's picker reads both)."""
    hint = _metadata(request, SUBSET_NAMESPACE)
    if SUBSET_KEY not in hint:
        return None
    value = hint[SUBSET_KEY]
    parts = value if isinstance(value, list) else [value]
    return {ep.strip() for part in parts for ep in str(part).split(",") if ep.strip()}


def served_endpoint(request: ProcessingRequest) -> str | None:
    """The `IP:PORT` that served the request, as the gateway reports it (None: not said)."""
    value = _metadata(request, DESTINATION_NAMESPACE).get(SERVED_KEY)
    return value if isinstance(value, str) and value else None


def endpoint_of(pod_id: str, port: int | None = None) -> str:
    """A pod's `IP:PORT` (its URL's host and port, or `port`; `[v6]:PORT` for IPv6)."""
    parts = urlsplit(pod_id)
    port = port or parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _set(name: str, value: str | bytes) -> HeaderValueOption:
    raw = value.encode() if isinstance(value, str) else value
    return HeaderValueOption(header=HeaderValue(key=name, raw_value=raw))


def picked(
    endpoints: Sequence[str],
    prefill_endpoint: str | None,
    on: str,
    body: bytes | None = None,
    content_length: int | None = None,
) -> ProcessingResponse:
    """The answer that routes the request to `endpoints[0]` (then, should it fail, to the
    others in order), as the response to its `request_headers` or `request_body` message
    (`on`). A P/D route names its prefill pod for
    the decode pod's sidecar; without one, a client's prefiller header is removed. `body`
    replaces the request body (BUFFERED mode only: a body the router changed);
    `content_length` is that of the body the picker sends on itself (FULL_DUPLEX_STREAMED:
    the client's header would be wrong when the router changed the body)."""
    assert endpoints, "the picker answers 503 when it has no pod"
    endpoint = ",".join(endpoints)  # the header's value and the metadata's: the same
    set_headers = [_set(DESTINATION_KEY, endpoint)]
    remove = [PREFILLER_URL_HEADER]
    if prefill_endpoint is not None:
        set_headers.append(_set(PREFILLER_HEADER, prefill_endpoint))
    else:
        remove.append(PREFILLER_HEADER)
    mutation = None
    if body is not None:
        mutation = BodyMutation(body=body)
        content_length = len(body)
    if content_length is not None:
        set_headers.append(_set("content-length", str(content_length)))
    common = CommonResponse(
        header_mutation=HeaderMutation(set_headers=set_headers, remove_headers=remove),
        body_mutation=mutation,
        # Envoy picks the route (and cluster) again, now with the destination set
        clear_route_cache=True,
    )
    metadata = Struct()
    metadata.update({DESTINATION_NAMESPACE: {DESTINATION_KEY: endpoint}})
    if on == "request_headers":
        return ProcessingResponse(
            request_headers=HeadersResponse(response=common), dynamic_metadata=metadata
        )
    return ProcessingResponse(request_body=BodyResponse(response=common), dynamic_metadata=metadata)


def passed_on(on: str) -> ProcessingResponse:
    """Let the message (`request_headers`, `response_body`, ...) go on unchanged."""
    if on.endswith("_headers"):
        return ProcessingResponse(**{on: HeadersResponse()})
    if on.endswith("_body"):
        return ProcessingResponse(**{on: BodyResponse()})
    return ProcessingResponse(**{on: {}})


def streamed(body: bytes, end_of_stream: bool, on: str) -> list[ProcessingResponse]:
    """The body sent back in FULL_DUPLEX_STREAMED mode, where the picker owns it: chunks of at
    most BODY_CHUNK_BYTES, the last one ending the stream when `end_of_stream`."""
    chunks = [body[i : i + BODY_CHUNK_BYTES] for i in range(0, len(body), BODY_CHUNK_BYTES)]
    chunks = chunks or [b""]
    return [
        ProcessingResponse(
            **{
                on: BodyResponse(
                    response=CommonResponse(
                        body_mutation=BodyMutation(
                            streamed_response=StreamedBodyResponse(
                                body=chunk, end_of_stream=end_of_stream and i == len(chunks) - 1
                            )
                        )
                    )
                )
            }
        )
        for i, chunk in enumerate(chunks)
    ]


def response_headers_answer(set_headers: Mapping[str, str]) -> ProcessingResponse:
    """The answer to `response_headers`: these headers added to the client's answer."""
    options = [_set(name, value) for name, value in set_headers.items()]
    return ProcessingResponse(
        response_headers=HeadersResponse(
            response=CommonResponse(header_mutation=HeaderMutation(set_headers=options))
        )
    )


def immediate(status: int, body: str, headers: Mapping[str, str]) -> ProcessingResponse:
    """Envoy answers the client with this itself (the request goes to no pod)."""
    options = [_set(name, value) for name, value in headers.items()]
    return ProcessingResponse(
        immediate_response=ImmediateResponse(
            status=HttpStatus(code=status),
            headers=HeaderMutation(set_headers=options),
            body=body.encode(),
            details=f"vllm-llmd endpoint picker: {status}",
        )
    )
