"""Fuzzing what a client sends the router (issue 22): request bodies and headers through a
real in-process router (with the tiny model's tokenizer, so chat messages are normalized and
rendered) before a recording pod, and the SLO header and flag parsers directly.

Every request gets an answer below 500 (a 4xx names what is wrong in a JSON error object);
a body the router cannot tokenize is routed by load (`tokenize_request` raises only
`UnsupportedRequestError`); SLO headers parse or raise `SLOHeaderError`. Profiles and shared
strategies: fuzz_settings.py.
"""

from __future__ import annotations

import asyncio
import json
import threading

import aiohttp
import pytest
from fuzz_settings import NASTY, examples, mangled, mutated, values
from hypothesis import example, given
from hypothesis import strategies as st
from router_harness import MODEL, RecordingPod, running_router

from vllm_llmd.router.client_body import MAX_JSON_DEPTH, json_depth
from vllm_llmd.router.slo import (
    FAIRNESS_HEADER,
    OBJECTIVE_HEADER,
    SLO,
    TPOT_HEADER,
    TTFT_HEADER,
    RequestClass,
    SLOConfig,
    SLOHeaderError,
    parse_model_slo,
    parse_objective,
)
from vllm_llmd.router.tokens import TokenizedRequest, TokenProcessor, UnsupportedRequestError

API_KEY = "fuzz-key"
BLOCK = 32
CHAT = {
    "model": MODEL,
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hello"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": '{"a": 1}'}}],
        },
        {"role": "tool", "tool_call_id": "1", "content": "42"},
        {"role": "developer", "content": "dev"},
    ],
    "max_tokens": 2,
}
COMPLETION = {"model": MODEL, "prompt": "hello there", "max_tokens": 2}
JSON_LEAF = st.one_of(values(), NASTY)
BODIES = st.one_of(
    st.sampled_from([CHAT, COMPLETION]).flatmap(lambda body: mutated(body, JSON_LEAF)),
    st.fixed_dictionaries({"model": st.just(MODEL)}, optional={"messages": values()}),
    values(),
)
# header values a client can send (no CR/LF); latin-1 beyond ASCII too
HEADER_TEXT = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=30
)
NUMBERS = st.one_of(
    st.sampled_from(["1", "0", "-1", "nan", "inf", "-inf", "1e308", "1e-320", "1_000", " 5 "]),
    st.floats().map(str),
    HEADER_TEXT,
)


def _header_text(data: bytes) -> str:
    """Bytes as a header value a client can send: latin-1, less control characters."""
    return "".join(c for c in data.decode("latin-1") if c >= " " and c != "\x7f")


HEADERS = st.fixed_dictionaries(
    {},
    optional={
        TTFT_HEADER: NUMBERS,
        TPOT_HEADER: NUMBERS,
        OBJECTIVE_HEADER: st.one_of(st.sampled_from(["premium", "batch", ""]), HEADER_TEXT),
        FAIRNESS_HEADER: HEADER_TEXT,
        "Authorization": st.one_of(
            st.just(f"Bearer {API_KEY}"),
            st.just(f"Bearer {API_KEY}").flatmap(lambda t: mangled(t.encode())).map(_header_text),
            HEADER_TEXT,
        ),
        "x-prefiller-host-port": HEADER_TEXT,
        "x-prefiller-url": HEADER_TEXT,
        "X-Request-Id": HEADER_TEXT,
    },
)


# ---- tokenize_request: the messages and prompts a router tokenizes -----------------------------


@pytest.fixture(scope="module")
def tokens(tiny_model) -> TokenProcessor:
    return TokenProcessor(tiny_model, BLOCK)


@examples(300)
@given(BODIES, st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
@example({"model": MODEL, "messages": [{"content": "no role"}]}, "/v1/chat/completions")
@example({"model": MODEL, "messages": ["not a message"]}, "/v1/chat/completions")
@example({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "/v1/chat/completions")
@example({"model": MODEL, "prompt": [[1, 2]]}, "/v1/completions")
@example({"model": MODEL, "prompt": [True, 2**70]}, "/v1/completions")
def test_a_body_is_tokenized_or_unsupported(tokens, body, path):
    try:
        tokenized = tokens.tokenize_request(path, body)
    except UnsupportedRequestError:
        return
    assert isinstance(tokenized, TokenizedRequest)
    assert all(isinstance(t, int) for t in tokenized.token_ids)


# ---- SLO headers and flags ------------------------------------------------------------------


SLO_CONFIG = SLOConfig(
    default_slo=SLO(ttft_s=1.0),
    model_slos={MODEL: SLO(tpot_s=0.05)},
    objectives={"premium": 5, "batch": -1},
)


@examples(300)
@given(HEADERS, st.one_of(st.none(), st.just(MODEL), st.text(max_size=5)))
@example({TTFT_HEADER: "5e-324"}, None)  # found: > 0 ms, yet 0.0 s (a 0 s SLO)
@example({TPOT_HEADER: "1e-321"}, MODEL)
def test_slo_headers_classify_or_are_an_slo_header_error(headers, model):
    try:
        request_class = SLO_CONFIG.classify(headers, model)
    except SLOHeaderError:
        return
    assert isinstance(request_class, RequestClass)
    for seconds in (request_class.slo.ttft_s, request_class.slo.tpot_s):
        assert seconds is None or 0 < seconds < float("inf")
    assert isinstance(request_class.fairness_id, str) and request_class.fairness_id


@examples(200)
@given(st.text(max_size=40))
@example("ttft=1e309")
@example("ttft=5e-324")
@example("ttft=nan,tpot=1")
@example(":ttft=1")
@example("a=9" * 30)
def test_slo_flags_parse_or_are_a_value_error(text):
    for parse in (SLO.parse, parse_objective, parse_model_slo):
        try:
            parsed = parse(text)
        except ValueError:
            continue
        slo = parsed if isinstance(parsed, SLO) else parsed[1]
        if isinstance(slo, SLO):
            for seconds in (slo.ttft_s, slo.tpot_s):
                assert seconds is None or 0 < seconds < float("inf")


@examples(200)
@given(values())
def test_json_depth_is_the_nesting_depth(value):
    def depth(v) -> int:
        if isinstance(v, dict):
            return 1 + max(map(depth, v.values()), default=0)
        if isinstance(v, list):
            return 1 + max(map(depth, v), default=0)
        return 0

    assert json_depth(value) == depth(value)


# ---- the router itself ------------------------------------------------------------------------


class RouterThread:
    """A recording pod and an in-process router on an event loop of their own thread, so a
    synchronous hypothesis test can send them requests."""

    def __init__(self, tokens: TokenProcessor) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.pod = self.run(RecordingPod().start())
        flags = ["--pod", self.pod.url, "--api-key", API_KEY]
        flags += [
            "--objective",
            "premium=5",
            "--objective",
            "batch=-1",
            "--max-body-bytes",
            "65536",
        ]
        self._router = running_router(flags, tokens=tokens)
        self.router, self.url = self.run(self._router.__aenter__())
        self.session = self.run(self._session())

    async def _session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession()

    def run(self, coroutine, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def post(self, path: str, data: bytes, headers: dict[str, str]) -> tuple[int, str]:
        async def send() -> tuple[int, str]:
            async with self.session.post(self.url + path, data=data, headers=headers) as answer:
                return answer.status, await answer.text()

        return self.run(send())

    def close(self) -> None:
        self.run(self.session.close())
        self.run(self._router.__aexit__(None, None, None))
        self.run(self.pod.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def router(tokens):
    served = RouterThread(tokens)
    try:
        yield served
    finally:
        served.close()


def _encoded(body: object) -> bytes:
    return json.dumps(body).encode()


RAW_BODIES = st.one_of(
    BODIES.map(_encoded),
    BODIES.map(_encoded).flatmap(mangled),
    st.binary(max_size=100),
)


@examples(300)
@given(RAW_BODIES, HEADERS, st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
@example(b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), {}, "/v1/completions")
@example(b'{"model": "m", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", {}, "/v1/completions")
@example(b"\xff\xfe", {}, "/v1/completions")
@example(_encoded(COMPLETION) + b" " * 70_000, {}, "/v1/completions")
@example(_encoded(COMPLETION), {"Authorization": f"Bearer {API_KEY}\xff"}, "/v1/completions")
def test_the_router_answers_every_request_below_500(router, body, headers, path):
    headers = {"Authorization": f"Bearer {API_KEY}", **headers}
    status, text = router.post(path, body, headers)
    assert status < 500, text
    if status >= 400:
        assert isinstance(json.loads(text).get("error"), dict), text
    if status == 200:  # only with the key
        assert headers["Authorization"] == f"Bearer {API_KEY}"


def test_the_router_serves_after_the_fuzzing(router):
    good = {"Authorization": f"Bearer {API_KEY}"}
    assert router.post("/v1/chat/completions", _encoded(CHAT), good)[0] == 200
    assert router.post("/v1/completions", _encoded(COMPLETION), good)[0] == 200
    assert router.post("/v1/completions", _encoded(COMPLETION), {})[0] == 401
    assert json_depth(CHAT) <= MAX_JSON_DEPTH
