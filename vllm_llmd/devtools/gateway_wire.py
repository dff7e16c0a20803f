"""Envoy's side of ext_proc v3 for the gateway stand-in (gateway.py): the messages its filter
sends, and how it applies the picker's answers (header mutations under Envoy's default rules,
body mutations, the destination endpoints). Pure functions over protobuf messages."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue, HeaderValueOption
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HttpBody,
    HttpHeaders,
    ProcessingRequest,
)
from google.protobuf.json_format import MessageToDict
from multidict import CIMultiDict

from vllm_llmd.router.epp_wire import DESTINATION_KEY, DESTINATION_NAMESPACE
from vllm_llmd.router.epp_wire import header_value as _value

BUFFERED = ProcessingMode.BodySendMode.BUFFERED
STREAMED = ProcessingMode.BodySendMode.STREAMED
FULL_DUPLEX = ProcessingMode.BodySendMode.FULL_DUPLEX_STREAMED
# HTTP/1.1 connection headers, not passed on (`host` travels as `:authority`)
HOP_BY_HOP = frozenset("connection keep-alive proxy-connection transfer-encoding upgrade".split())
HOP_BY_HOP |= {"te", "trailer", "host"}
# what is forwarded gets its length anew (the picker may have changed the body)
NOT_FORWARDED = HOP_BY_HOP | {"content-length"}
# Envoy's default HeaderMutationRules: an ext_proc server cannot change these
PROTECTED = frozenset([":method", ":authority", ":scheme", "host"])
Headers = CIMultiDict[str]


class BadMutation(Exception):
    """The picker's mutations would make Envoy send a broken request."""


def raw(value: str) -> bytes:
    """A header value's bytes as the client sent them (aiohttp keeps non-UTF-8 ones escaped)."""
    return value.encode("utf-8", "surrogateescape")


def message(kind: str, **fields: Any) -> Any:
    """A ProcessingRequest: `<kind>_headers` with `items` (name, value) or `<kind>_body`."""
    if kind.endswith("_headers"):
        headers = HeaderMap(
            headers=[HeaderValue(key=k, raw_value=raw(v)) for k, v in fields.pop("items")]
        )
        return ProcessingRequest(**{kind: HttpHeaders(headers=headers, **fields)})
    return ProcessingRequest(**{kind: HttpBody(**fields)})


def mutate(headers: Headers, mutation: Any) -> None:
    """Apply a HeaderMutation as Envoy does (`append` defaults to false in ext_proc)."""
    for option in mutation.set_headers:
        name, value = option.header.key.lower(), _value(option.header)
        if name in PROTECTED or name.startswith("x-envoy-"):
            continue
        if option.append.value:
            headers.add(name, value)
        elif option.append_action == HeaderValueOption.ADD_IF_ABSENT:
            headers.setdefault(name, value)
        elif option.append_action != HeaderValueOption.OVERWRITE_IF_EXISTS or name in headers:
            headers[name] = value
    for name in mutation.remove_headers:
        if not name.startswith(":") and name.lower() not in PROTECTED:
            headers.popall(name, None)


def drop(headers: Headers, names: Iterable[str]) -> None:
    for name in names:
        headers.popall(name, None)


def common(answer: Any) -> Any:
    """The CommonResponse of a headers or body answer."""
    return getattr(answer, answer.WhichOneof("response")).response


def mutated(body: bytes, common: Any) -> bytes:
    """A (non-streamed) body after the answer's body mutation."""
    mutation = common.body_mutation
    kind = mutation.WhichOneof("mutation")
    if kind == "body":
        return bytes(mutation.body)
    return b"" if kind == "clear_body" and mutation.clear_body else body


def destinations(answers: Iterable[Any], headers: Headers) -> list[str]:
    """The endpoints the picker named, in order (the first, then its fallbacks): the
    `envoy.lb` metadata, else the header."""
    named = headers.get(DESTINATION_KEY)
    for answer in answers:
        metadata = MessageToDict(answer.dynamic_metadata).get(DESTINATION_NAMESPACE, {})
        named = metadata.get(DESTINATION_KEY, named)
    return [endpoint.strip() for endpoint in (named or "").split(",") if endpoint.strip()]
