"""`vllm-llmd-sim calibrate URL`: measure a real vLLM server and fit a LatencyProfile.

Three sweeps of streamed /v1/completions, every prompt a list of fresh random token ids (so
nothing is cached unless a sweep means it to be):

- prefill: `batch` concurrent one-token requests of `length` tokens; the slowest one's time
  (for one token, its time to first token) against the batch's total prompt tokens gives
  `prefill_s_per_token` (slope);
- cached: one prompt of each length sent again right after its first run (three times, the
  median), its TTFT now over a cached prefix, gives `prefill_s_per_cached_token` (the slope
  of a line with its own intercept, the request's fixed cost; right after: a later sweep could
  evict it from a small cache, and the re-send would be priced as cached but computed);
- decode: the shortest and the longest prompt shape again, `batch` concurrent requests of
  `output_tokens` each; the time between their answers' chunks once every one of them is
  decoding (so no other request's prefill chunk is in those steps: the simulator adds those
  itself), against batch size and context, gives `base_s` (the step floor),
  `decode_s_per_seq` and `decode_s_per_ktoken`.

Fits are least squares, clipped at 0 (a coefficient the noise makes negative means "too small
to see here"). The prefill fit's intercept, less the step floor, is `request_s`: what a
request spends outside the engine (the client's HTTP, tokenizing, the way back). Token ids are
drawn below `max_token_id` (any vocabulary has that many).
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from vllm_llmd.devtools.client import StreamTiming, get_text, timed_stream
from vllm_llmd.sim.profile import LatencyProfile


@dataclass(frozen=True)
class CalibrationPlan:
    """What to send."""

    lengths: Sequence[int] = (256, 1024, 2048, 4096)
    batches: Sequence[int] = (1, 2, 4, 8)
    output_tokens: int = 32
    max_token_id: int = 1000
    seed: int = 0


def served_model(url: str) -> str:
    """The first model the server lists (GET /v1/models)."""
    models = json.loads(get_text(url.rstrip("/") + "/v1/models"))["data"]
    if not models:
        raise RuntimeError(f"{url} serves no model")
    return str(models[0]["id"])


class _Client:
    def __init__(self, url: str, model: str, plan: CalibrationPlan) -> None:
        self.url, self.model, self.plan = url.rstrip("/"), model, plan
        self.rng = random.Random(plan.seed)

    def prompt(self, num_tokens: int) -> list[int]:
        return [self.rng.randrange(1, self.plan.max_token_id) for _ in range(num_tokens)]

    def together(self, prompts: Sequence[list[int]], max_tokens: int) -> list[StreamTiming]:
        """The prompts sent at once, each on its own connection."""
        with ThreadPoolExecutor(len(prompts)) as pool:
            futures = [
                pool.submit(timed_stream, self.url, self.model, p, max_tokens) for p in prompts
            ]
            return [f.result() for f in futures]


def decoding_tpot(timings: Sequence[StreamTiming]) -> float | None:
    """Mean seconds between answer chunks once every request of the batch is decoding (its
    first chunk came), over the requests with two chunks past that; None if none has."""
    all_decoding = max(t.sent_at + t.ttft_s for t in timings)
    tpots = []
    for timing in timings:
        times = [timing.sent_at + c for c in timing.chunk_s if timing.sent_at + c >= all_decoding]
        if len(times) >= 2:
            tpots.append((times[-1] - times[0]) / (len(times) - 1))
    return sum(tpots) / len(tpots) if tpots else None


def _fit(features: list[list[float]], seconds: list[float]) -> list[float]:
    """Least-squares coefficients, each clipped at 0."""
    solution = np.linalg.lstsq(np.asarray(features), np.asarray(seconds), rcond=None)[0]
    return [max(0.0, float(c)) for c in solution]


def calibrate(
    url: str, model: str | None = None, plan: CalibrationPlan | None = None, log: bool = True
) -> LatencyProfile:
    """Measure the server at `url` and fit a profile (see the module docstring)."""
    plan = plan or CalibrationPlan()
    model = model or served_model(url)
    client = _Client(url, model, plan)
    say = print if log else (lambda *_: None)
    client.together([client.prompt(64)], 4)  # warm up (first-request compilation, caches)

    prefill_x, prefill_y = [], []
    cached_ttfts: list[tuple[int, float]] = []  # (length, TTFT) of a prompt sent again
    one_token: dict[tuple[int, int], float] = {}  # (length, batch) -> mean request time
    for length in plan.lengths:
        for k, batch in enumerate(plan.batches):
            batch_prompts = [client.prompt(length) for _ in range(batch)]
            timings = client.together(batch_prompts, 1)
            # one token: the whole request is its time to first token (a stream's first
            # chunk may carry no text, so the stream's own TTFT can come late)
            ttft = max(t.total_s for t in timings)
            one_token[length, batch] = sum(t.total_s for t in timings) / batch
            prefill_x.append([1.0, batch * length])
            prefill_y.append(ttft)
            say(f"prefill {batch} x {length} tokens: TTFT {ttft * 1000:.1f} ms")
            if k == 0:
                # one prompt of each length sent again at once, while its blocks are surely
                # still cached: later sweeps would evict them from a small cache (and a pod
                # without a lower tier would compute it again, priced as cached). The median
                # of three: the cached cost is a few ms over a ~40 ms floor, and one reading's
                # noise could set the fit's slope (one run fitted 0)
                cached = statistics.median(
                    client.together([batch_prompts[0]], 1)[0].total_s for _ in range(3)
                )
                cached_ttfts.append((length, cached))
                say(f"cached {length} tokens: TTFT {cached * 1000:.1f} ms")
    prefill_fixed, per_token = _fit(prefill_x, prefill_y)
    # a line with its own intercept: a cached request's fixed cost (its step's floor, the
    # HTTP round trip) is ~40 ms on the CPU pods, where the prefill fit's intercept, set by
    # prompts of thousands of tokens, says ~10; through the origin, the rest of it went into
    # the slope and priced a cached token 3x too high
    _, per_cached = _fit(
        [[1.0, float(length)] for length, _ in cached_ttfts], [ttft for _, ttft in cached_ttfts]
    )

    decode_x, decode_y = [], []
    contexts = (min(plan.lengths), max(plan.lengths))
    outputs = max(2, plan.output_tokens)
    for context in contexts:
        for batch in plan.batches:
            timings = client.together([client.prompt(context) for _ in range(batch)], outputs)
            tpot = decoding_tpot(timings)
            if tpot is None:  # too few tokens past the batch's prefills: time past one token
                total = sum(t.total_s for t in timings) / batch
                tpot = max(0.0, (total - one_token[context, batch]) / (outputs - 1))
            decode_x.append([1.0, float(batch), batch * (context + outputs / 2) / 1000.0])
            decode_y.append(tpot)
            say(f"decode {batch} x {context} context: TPOT {tpot * 1000:.2f} ms")
    base, per_seq, per_ktoken = _fit(decode_x, decode_y)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    return LatencyProfile(
        base_s=base,
        prefill_s_per_token=per_token,
        prefill_s_per_cached_token=per_cached,
        decode_s_per_seq=per_seq,
        decode_s_per_ktoken=per_ktoken,
        source=f"calibrated against {url} ({model}) at {stamp}",
        request_s=max(0.0, prefill_fixed - base),
    )
