"""Routing on predicted latency: the `slo` policy's choice of pod.

For each candidate the router builds the request's shape on that pod (uncached and cached
prompt tokens from the index, the pod's queue and batch) and asks the pod's latency model
(`latency.py`) for TTFT and TPOT. A pod's *SLO ratio* is the larger of predicted/target over
the request's SLOs, and the request *meets* its SLO on a pod when that ratio is at most
`1-headroom`. With SLOs, the heuristic policy (kv_aware: cache affinity against load) chooses,
and its pod is left only when it is predicted late (ratio > 1) for a pod predicted surely on
time (ratio <= DIVERT_RATIO; the heuristic chooses among those). Keeping each prefix where it
is cached is what keeps the next requests on time. In the simulator (16 pods, 7 requests/s
each, kv_aware 97.5% on time), choosing the fastest pod whenever none was predicted on time
spread prefixes and spiralled down to 2% on time; choosing among the pods predicted on time
(else as kv_aware) reached 91%, diversions on predictions within the model's error. What `slo`
adds is knowing who will be late: the admission queue holds or sheds them (`admission.py`). A
cache hit lowers the predicted TTFT by what the model learned a cached token saves. A request
without SLOs goes where the heuristic sends it: choosing the pod of the smallest predicted
latency spreads prefixes as above, and with no SLO to meet no pod's lateness calls for a
diversion. A prefill pod for a P/D step is still the one of the smallest predicted TTFT
(which counts its cache hit).

Until the cluster's TTFT model of the mode has `min_samples` observations (a pod's own model
starts from the cluster's: `latency.py`), the heuristic policy (kv_aware) decides and the
request counts as meeting its SLO (nothing better is known). A request that would miss even on
an idle pod (a long cold prompt against a tight TTFT SLO) is not held back: waiting cannot help
it, and serving it warms the cache for the requests that share its prefix. Saturated pods (see
`is_saturated`) are passed over while any candidate is not.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from vllm_llmd.events.model import MEDIUM_CPU, MEDIUM_GPU
from vllm_llmd.router.latency import LatencyModels, Prediction, RequestShape, ServeMode
from vllm_llmd.router.load import PodLoad
from vllm_llmd.router.scoring import (
    Decision,
    ScoreInput,
    ScoringConfig,
    ScoringPolicy,
    kv_gauge_full,
)
from vllm_llmd.router.slo import SLO

# the heuristic's pod predicted late is left for one predicted within this share of the SLO
DIVERT_RATIO = 0.5
# output tokens assumed when a request sets no max_tokens (only ranks pods without SLOs)
DEFAULT_OUTPUT_TOKENS = 128


def estimated_waiting(load: PodLoad) -> int:
    """The pod's queue: its scraped gauge, or, when fresher, the router's in-flight requests
    beyond the pod's running batch (a scrape lags; the router knows what it sent at once)."""
    return max(load.num_waiting, load.num_in_flight - load.num_running)


def is_saturated(load: PodLoad, config: ScoringConfig, kv_room: bool = False) -> bool:
    """The pod cannot take more work now: its queue or its KV cache is full (`kv_gauge_full`)."""
    return estimated_waiting(load) >= config.max_waiting or kv_gauge_full(
        load, config.max_kv_usage, kv_room
    )


def request_shape(request: ScoreInput, pod: str, num_tokens: int, block_size: int) -> RequestShape:
    """The request as seen on `pod` at this moment."""
    load = request.load(pod)
    cache = request.cache(pod)
    cached = min(num_tokens, cache.num_blocks * block_size)
    # the blocks only a lower tier holds, full blocks (the sums stay within `cached`, which
    # num_tokens may cut short of the blocks); one pass when the device holds them all
    host = storage = 0
    below_device = len(cache.tiers) - cache.tiers.count(MEDIUM_GPU)
    if below_device:
        host_blocks = cache.tiers.count(MEDIUM_CPU)
        host = min(cached, host_blocks * block_size)
        storage = min(cached - host, (below_device - host_blocks) * block_size)
    return RequestShape(
        uncached_tokens=num_tokens - cached,
        cached_tokens=cached,
        host_tokens=host,
        storage_tokens=storage,
        ahead_tokens=load.prefill_tokens,
        active=max(load.num_running, load.num_in_flight - load.num_prefilling),
        arrival_rate=load.arrival_rate,
        ahead_elapsed_s=load.prefill_elapsed_s,
    )


@dataclass(frozen=True, slots=True)
class SLOChoice:
    """The chosen pod, its predicted latency (None while cold), and whether it meets the SLO."""

    decision: Decision
    prediction: Prediction | None
    shape: RequestShape
    meets: bool
    # the best pod would meet the SLO were it idle: a miss now is caused by load, so waiting
    # (or shedding) can help; otherwise the miss is the request's own (a long cold prompt)
    # and it is served at once, best effort, which also warms the cache for the next one
    meets_when_idle: bool = True

    @property
    def load_bound(self) -> bool:
        """Missing the SLO because of load: the case for queueing or shedding."""
        return not self.meets and self.meets_when_idle


class SLOPlanner:
    """Chooses by predicted latency (module doc); `fallback` decides while models are cold."""

    def __init__(
        self,
        models: LatencyModels,
        fallback: ScoringPolicy,
        scoring: ScoringConfig,
        block_size: int,
        headroom: float,
    ) -> None:
        self.models = models
        self.fallback = fallback
        self.scoring = scoring
        self.block_size = block_size
        self.headroom = headroom

    def all_saturated(self, request: ScoreInput) -> bool:
        return all(self._saturated(request, p) for p in request.candidates)

    def _saturated(self, request: ScoreInput, pod: str) -> bool:
        return pod in request.full or is_saturated(request.load(pod), self.scoring, request.kv_room)

    def choose(
        self,
        request: ScoreInput,
        num_tokens: int | None,
        slo: SLO,
        output_tokens: int | None = None,
        mode: ServeMode = "direct",
    ) -> SLOChoice:
        tokens = num_tokens or 0
        has_slo = slo.is_set
        if not has_slo and mode == "direct":
            decision = self.fallback.choose(request)
            decision = Decision(
                decision.pod, f"{decision.reason} (no SLO)", decision.scores, decision.hit_blocks
            )
            shape = request_shape(request, decision.pod, tokens, self.block_size)
            return SLOChoice(decision, None, shape, True)
        shapes = {p: request_shape(request, p, tokens, self.block_size) for p in request.candidates}
        predictions = {p: self.models.predict(p, mode, shapes[p]) for p in request.candidates}
        cold = [p for p, pr in predictions.items() if pr.ttft_s is None]
        if num_tokens is None or cold:
            decision = self.fallback.choose(request)
            why = "no prompt tokens" if num_tokens is None else f"{len(cold)} cold models"
            decision = Decision(
                decision.pod,
                f"{decision.reason} (latency model not used: {why})",
                decision.scores,
                decision.hit_blocks,
            )
            return SLOChoice(decision, None, shapes[decision.pod], True)
        outputs = output_tokens or DEFAULT_OUTPUT_TOKENS
        ratios = {p: _slo_ratio(predictions[p], slo, outputs) for p in request.candidates}
        free = [p for p in request.candidates if not self._saturated(request, p)]
        pool = free or list(request.candidates)
        limit = 1.0 - self.headroom
        if has_slo:
            # affinity decides among the pods on time, or among all when none is: a request
            # late everywhere keeps its prefix's pod (the admission queue may hold it back)
            pod = self.fallback.choose(request).pod
            if ratios[pod] > 1.0:
                sure = [p for p in request.candidates if ratios[p] <= DIVERT_RATIO]
                if sure:
                    among = replace(request, candidates=sure)
                    pod = self.fallback.choose(among).pod
        else:
            pod = min(pool, key=lambda p: (ratios[p], shapes[p].active, p))
        prediction = predictions[pod]
        meets = not has_slo or ratios[pod] <= limit
        meets_when_idle = meets or any(
            _slo_ratio(self.models.predict(p, mode, shapes[p].alone()), slo, outputs) <= limit
            for p in request.candidates
        )
        assert prediction.ttft_s is not None
        tpot = "?" if prediction.tpot_s is None else f"{prediction.tpot_s * 1000:.1f}"
        reason = (
            f"slo: predicted TTFT {prediction.ttft_s * 1000:.0f} ms, "
            f"TPOT {tpot} ms, {shapes[pod].cached_tokens} cached tokens"
            + (f", SLO ratio {ratios[pod]:.2f}" if has_slo else "")
            + ("" if free else "; all candidates saturated")
        )
        scores = {p: -r for p, r in ratios.items()}
        decision = Decision(pod, reason, scores, request.cache(pod).num_blocks)
        return SLOChoice(decision, prediction, shapes[pod], meets, meets_when_idle)


def _slo_ratio(prediction: Prediction, slo: SLO, output_tokens: int) -> float:
    """max(predicted / target) over the SLOs set; a TPOT not learned yet (no streamed answer
    seen) is left out. Without SLOs: predicted seconds to the end of the answer."""
    assert prediction.ttft_s is not None
    tpot = prediction.tpot_s
    ratios = []
    if slo.ttft_s is not None:
        ratios.append(prediction.ttft_s / slo.ttft_s)
    if slo.tpot_s is not None and tpot is not None:
        ratios.append(tpot / slo.tpot_s)
    if ratios:
        return max(ratios)
    return prediction.ttft_s + (tpot or 0.0) * output_tokens
