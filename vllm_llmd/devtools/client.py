"""A minimal blocking OpenAI-API client for tests, the demo and benchmarks (stdlib only)."""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from vllm_llmd.prometheus_text import MetricSamples, parse_prometheus_text


class HTTPStatusError(RuntimeError):
    """The server answered with a non-2xx status; `status` and `body` say what it said."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


def post_json(
    url: str, body: dict[str, Any], headers: dict[str, str] | None = None, timeout: float = 300
) -> dict[str, Any]:
    """POST body as JSON; return the decoded JSON answer or raise HTTPStatusError."""
    request = urllib.request.Request(
        url,
        json.dumps(body).encode(),
        {"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer: dict[str, Any] = json.loads(response.read())  # the OpenAI API's objects
    except urllib.error.HTTPError as exc:
        raise HTTPStatusError(exc.code, exc.read().decode(errors="replace")) from None
    return answer


def get_text(url: str, timeout: float = 30) -> str:
    """GET url and return the body as text (e.g. /metrics)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read()
    return body.decode()


def complete(
    base_url: str,
    model: str,
    prompt: str | list[int],
    max_tokens: int = 16,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Greedy /v1/completions (with `headers`, if given); the answer carries the generated
    token ids."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "return_token_ids": True,
        **extra,
    }
    return post_json(base_url + "/v1/completions", body, headers)


def completion_token_ids(answer: dict[str, Any]) -> list[int]:
    """The generated token ids of a /v1/completions answer made by `complete`."""
    return list(answer["choices"][0]["token_ids"])


def scrape_metrics(base_url: str) -> MetricSamples:
    """GET /metrics and parse it: {(sample name, frozenset of label items): value}."""
    return parse_prometheus_text(get_text(base_url + "/metrics"))


def metric_sum(samples: MetricSamples, name: str, **labels: str) -> float:
    """Sum of the samples called name whose labels include every given label."""
    wanted = set(labels.items())
    return sum(v for (n, lbls), v in samples.items() if n == name and wanted <= lbls)


@dataclass(frozen=True)
class StreamTiming:
    """Client-side timing of one streamed completion."""

    ttft_s: float  # request sent -> first content chunk
    total_s: float  # request sent -> end of stream
    text: str
    # time.perf_counter() when it was sent, and each content chunk's arrival after that
    sent_at: float = 0.0
    chunk_s: tuple[float, ...] = ()


def timed_stream(
    base_url: str,
    model: str,
    prompt: str | list[int],
    max_tokens: int = 16,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> StreamTiming:
    """Greedy streamed /v1/completions; measures time to first token and to the end."""
    url = urllib.parse.urlsplit(base_url)
    body = json.dumps(
        {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            **extra,
        }
    )
    if url.hostname is None:
        raise ValueError(f"base_url {base_url!r} names no host")
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=600)
    started = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    chunk_s: list[float] = []
    try:
        conn.request(
            "POST", "/v1/completions", body, {"Content-Type": "application/json", **(headers or {})}
        )
        response = conn.getresponse()
        if response.status != 200:
            raise HTTPStatusError(response.status, response.read().decode(errors="replace"))
        for line in response:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            text = "".join(c.get("text") or "" for c in chunk.get("choices", []))
            if text:
                now = time.perf_counter()
                first = now if first is None else first
                chunk_s.append(now - started)
            parts.append(text)
    finally:
        conn.close()
    end = time.perf_counter()
    return StreamTiming(
        (first or end) - started, end - started, "".join(parts), started, tuple(chunk_s)
    )
