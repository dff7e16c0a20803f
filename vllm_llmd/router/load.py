"""How busy a pod is: vLLM's queue and KV-cache gauges, plus the router's own in-flight count.

`scrape_pod_load` reads three gauges from the pod's Prometheus `/metrics`:

    vllm:num_requests_waiting   requests queued, not yet scheduled
    vllm:num_requests_running   requests in the running batch
    vllm:kv_cache_usage_perc    fraction (0..1, despite the name) of KV blocks in use

and, from `vllm:cache_config_info`, how many KV blocks the pod has (`num_gpu_blocks`).

A pod with several engines (data parallel) publishes one sample per engine: the counts are
summed and the KV usage is the highest (the fullest engine is the one a request may hit).
Scrapes lag by one interval, so the router adds `num_in_flight`, the requests it sent that have
not finished, which it knows at once, and `arrival_rate`, how fast it has been sending them
(`ArrivalRate`): what a request's prefill would delay on that pod is the requests still to come.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from vllm_llmd.prometheus_text import parse_prometheus_text

WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
KV_USAGE = "vllm:kv_cache_usage_perc"
_GAUGES = (WAITING, RUNNING, KV_USAGE)
CACHE_CONFIG = "vllm:cache_config_info"


class PodLoadError(RuntimeError):
    """A pod's load could not be read (unreachable, timeout, bad status, not vLLM metrics)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot read the load of {url}: {reason}")
        self.url = url
        self.reason = reason


@dataclass(frozen=True, slots=True)
class PodLoad:
    """One pod's load at one moment."""

    # requests queued in the pod's scheduler (vllm:num_requests_waiting)
    num_waiting: int = 0
    # requests in the pod's running batch (vllm:num_requests_running)
    num_running: int = 0
    # fraction of the pod's KV-cache blocks in use, 0..1 (vllm:kv_cache_usage_perc)
    kv_usage: float = 0.0
    # requests this router sent to the pod that have not finished yet
    num_in_flight: int = 0
    # ... of which no answer byte came yet (queued or prefilling in the pod), and their
    # uncached prompt tokens: the prefill work ahead of a new request, known at once (the
    # pod's gauges lag by a scrape)
    num_prefilling: int = 0
    prefill_tokens: int = 0
    # requests per second this router has sent the pod lately (ArrivalRate)
    arrival_rate: float = 0.0
    # seconds the pod has been working on that prefill work (PodState.ahead_since): a request
    # sent now waits for what is left of it, not for all of it
    prefill_elapsed_s: float = 0.0
    # the pod's KV cache in blocks (vllm:cache_config_info; 0: not known), and the distinct
    # blocks this router's requests in flight there hold (their prompts' full blocks, counted
    # once however many share them, plus each one's partial block and answer)
    kv_blocks: int = 0
    held_blocks: int = 0

    def __post_init__(self) -> None:
        counts = (self.num_waiting, self.num_running, self.num_in_flight, self.num_prefilling)
        if min(*counts, self.prefill_tokens, self.kv_blocks, self.held_blocks) < 0:
            raise ValueError(f"request counts must be >= 0: {self}")
        if not (math.isfinite(self.arrival_rate) and self.arrival_rate >= 0):
            raise ValueError(f"arrival_rate must be a finite rate >= 0, got {self.arrival_rate}")
        if not (math.isfinite(self.prefill_elapsed_s) and self.prefill_elapsed_s >= 0):
            raise ValueError(f"prefill_elapsed_s must be finite and >= 0: {self}")
        if not 0.0 <= self.kv_usage <= 1.0:
            raise ValueError(f"kv_usage must be in 0..1, got {self.kv_usage}")

    @property
    def num_active(self) -> int:
        """Running plus the router's in-flight requests (the second key of least-loaded)."""
        return self.num_running + self.num_in_flight


class ArrivalRate:
    """Requests per second sent to one pod lately: a count of sends that decays with time
    constant `window_s`. A steady rate r reads as r once a few windows have passed; a burst
    shows at once and fades within a few windows. No history is kept."""

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = window_s
        self._clock = clock
        self._count = 0.0
        self._at = clock()

    def add(self) -> None:
        """One request sent now."""
        now = self._clock()
        self._count = self._decayed(now) + 1.0
        self._at = now

    def per_second(self) -> float:
        return self._decayed(self._clock()) / self.window_s

    def _decayed(self, now: float) -> float:
        return self._count * math.exp(-max(0.0, now - self._at) / self.window_s)


def pod_load_from_metrics(text: str, num_in_flight: int = 0) -> PodLoad:
    """A PodLoad from the text of a vLLM /metrics page; ValueError if the gauges are missing."""
    # Parse only the three gauges' lines: a vLLM page is mostly histograms we do not need.
    totals: dict[str, list[float]] = {name: [] for name in _GAUGES}
    kv_blocks: list[int] = []  # per engine (data parallel: the smallest holds a request)
    for (name, labels), value in parse_prometheus_text(text, only=(*_GAUGES, CACHE_CONFIG)).items():
        if name in totals:
            totals[name].append(value)
        elif name == CACHE_CONFIG:
            blocks = dict(labels).get("num_gpu_blocks", "")
            if blocks.isdigit() and int(blocks) > 0:
                kv_blocks.append(int(blocks))
    missing = [name for name, values in totals.items() if not values]
    if missing:
        raise ValueError(f"no {', '.join(missing)} in the metrics: not a vLLM /metrics page?")
    not_finite = [name for name, values in totals.items() if not all(map(math.isfinite, values))]
    if not_finite:
        raise ValueError(f"{', '.join(not_finite)} is not a finite number in the metrics")
    return PodLoad(
        num_waiting=int(sum(totals[WAITING])),
        num_running=int(sum(totals[RUNNING])),
        kv_usage=min(1.0, max(0.0, max(totals[KV_USAGE]))),
        num_in_flight=num_in_flight,
        kv_blocks=min(kv_blocks, default=0),
    )


async def scrape_pod_load(
    session: aiohttp.ClientSession, url: str, *, timeout: float = 2.0, num_in_flight: int = 0
) -> PodLoad:
    """GET `url`/metrics and read the pod's load; PodLoadError on any failure.

    Args:
        session: the router's shared HTTP session.
        url: the pod's base URL, e.g. "http://10.0.0.5:8000".
        timeout: seconds for the whole request.
        num_in_flight: the router's in-flight count for this pod, copied into the result.
    """
    metrics_url = url.rstrip("/") + "/metrics"
    try:
        async with session.get(
            metrics_url, timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False
        ) as resp:
            if resp.status != 200:
                raise PodLoadError(url, f"/metrics answered HTTP {resp.status}")
            text = await resp.text()
    except asyncio.TimeoutError:
        raise PodLoadError(url, f"no answer within {timeout}s") from None
    except aiohttp.ClientError as exc:
        raise PodLoadError(url, repr(exc)) from exc
    try:
        return pod_load_from_metrics(text, num_in_flight)
    except ValueError as exc:
        raise PodLoadError(url, str(exc)) from exc
