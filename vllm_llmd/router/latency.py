"""Per-pod latency models, learned online from what the router observes.

For every pod and every way it serves (`direct`: prompt and decode on one pod, `prefill`: the
prompt half of a P/D pair, `decode`: the decode half, whose prompt arrives by transfer), the
router keeps two small linear models:

    TTFT  ~ a + b * (uncached_ktokens + ahead_ktokens) + c * cached_ktokens
              + d * host_ktokens + f * storage_ktokens + e * active
    TPOT  ~ a + b * active

`uncached_ktokens` are the prompt tokens the pod must compute (thousands), `cached_ktokens` the
ones its cache (or a transfer) provides, `host_ktokens` and `storage_ktokens` those of them held
only below the device cache, in host memory and on disk or in the shared tier (the uncached
tokens counted per tier: the connector loads them into newly allocated blocks before the prompt
runs, so a token of each tier costs more than a device hit's, `d` and `f` more; a pod without
that tier never excites its term, which stays 0), `ahead_ktokens` the uncached prompt tokens of the
requests the router sent it that have not begun answering (the prefill work queued ahead: the
router knows it at once, where the pod's gauges lag a scrape and a queued request's cost ranges
from a cached prompt's milliseconds to a cold one's seconds), less what the pod has computed of
them since it took them on (`RequestShape.ttft_features`), and `active` its decode batch (the
router's requests that are answering, or the pod's running gauge if larger), all as the router
saw them at dispatch. Prefill cost is close to linear in uncached tokens, its own and those
ahead of it alike, so both share one cost per token: a cost of its own for the tokens ahead
was fitted mostly on the few long TTFTs of queued requests, which weigh least in a fit of
relative errors, and predicted warm requests queued behind a cold one at a third of what they
took (replayed from bench_slo's audit logs at 2 and 4 requests/s, the shared cost cut the
median error from 28% to 25% and from 21% to 17%). A decode step slows with the batch: a line
per term is enough to rank pods and to tell whether an SLO can be met, and every coefficient
reads as "seconds per unit", so an operator can check it.

Fitting is least squares with a forgetting factor (old behaviour fades: a pod that got slower
is believed within ~1/(1-forget) requests), pulled toward a prior (`ForgettingRidge`): no
history is kept, a direction the observations do not tell apart stays at the prior, and no cost
comes out negative. The squares are of *relative* errors (each observation weighted by 1/y²):
an SLO is a ratio to its target, and a plain fit spends itself on the seconds-long TTFTs of
queued cold prompts and predicts every 50 ms answer high by what its intercept absorbed (in the
simulator at a saturated rate, median TTFT error 53% plain, 19% relative). The prior of a pod
is the cluster's fit (every pod's observations in that mode), so a new pod predicts from its
first request on, and pods of one hardware and model teach each other. Until the cluster has
`min_samples` observations of a mode, nothing is predicted in it and the router falls back to
its heuristic policy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, get_args

import numpy as np

from vllm_llmd.router.ridge import ForgettingRidge, Vector

# how a pod serves a request: all of it, or one half of a P/D pair
ServeMode = Literal["direct", "prefill", "decode"]
SERVE_MODES: tuple[ServeMode, ...] = get_args(ServeMode)


@dataclass(frozen=True, slots=True)
class RequestShape:
    """What the router knows about a request and a pod at dispatch."""

    uncached_tokens: int
    cached_tokens: int
    # uncached prompt tokens of the requests ahead of it at the pod (not answering yet)
    ahead_tokens: int
    # the pod's decode batch
    active: int
    # requests per second reaching the pod lately (PodLoad.arrival_rate): not a latency
    # feature, but who waits behind this request's prompt (routing.delay_to_others)
    arrival_rate: float = 0.0
    # seconds the pod has already spent on the work ahead (PodLoad.prefill_elapsed_s)
    ahead_elapsed_s: float = 0.0
    # of cached_tokens, those held only below the device cache: in host memory, and on
    # disk or in the shared tier (the connector loads them before the prompt runs)
    host_tokens: int = 0
    storage_tokens: int = 0

    def __post_init__(self) -> None:
        host, storage = self.host_tokens, self.storage_tokens
        if host < 0 or storage < 0 or host + storage > self.cached_tokens:
            raise ValueError(
                f"host ({self.host_tokens}) and storage ({self.storage_tokens}) tokens must be "
                f">= 0 and within the cached ones ({self.cached_tokens})"
            )

    def ttft_features(self, s_per_ktoken: float = 0.0) -> Vector:
        """The TTFT fit's features. `s_per_ktoken`, the pod's seconds per thousand uncached
        tokens (the fit's own coefficient), turns `ahead_elapsed_s` into tokens ahead already
        computed: a request sent 400 ms into a 500 ms prefill waits 100 ms of it, not 500 (a
        cached prompt took 36 or 334 ms by where in another's prefill step it landed: the
        fit's error at load). The tokens ahead cost what the request's own uncached ones do:
        one feature, the pod's compute ahead of the first token."""
        ahead = self.ahead_tokens / 1000.0
        if s_per_ktoken > 0.0 and self.ahead_elapsed_s > 0.0:
            ahead = max(0.0, ahead - self.ahead_elapsed_s / s_per_ktoken)
        return np.array(
            [
                1.0,
                self.uncached_tokens / 1000.0 + ahead,
                self.cached_tokens / 1000.0,
                self.host_tokens / 1000.0,
                self.storage_tokens / 1000.0,
                float(self.active),
            ]
        )

    def after_prefill(self, seconds: float) -> RequestShape:
        """The request as its decode pod gets it after a P/D prefill of `seconds`: its prompt
        comes by transfer, so the tokens it lacked are cached ones there (the decode model's
        cached-token term is the pull's cost), and the work ahead of it there has gone on
        that much longer. With its uncached tokens left in, the one compute term stood for
        the work ahead (1 s per 1k tokens) and for the prompt's own tokens (a transfer: next
        to nothing) at once, and fitted neither."""
        return replace(
            self,
            uncached_tokens=0,
            cached_tokens=self.cached_tokens + self.uncached_tokens,
            ahead_elapsed_s=self.ahead_elapsed_s + max(0.0, seconds),
        )

    def alone(self) -> RequestShape:
        """The request on the pod with nothing ahead of it and no decode batch."""
        return replace(self, ahead_tokens=0, active=0, ahead_elapsed_s=0.0)

    def tpot_features(self) -> Vector:
        return np.array([1.0, float(self.active)])


# the TTFT fit's features, in RequestShape.ttft_features' order (the weights read the same)
TTFT_FEATURES = (
    "constant",
    "compute_ktokens",
    "cached_ktokens",
    "host_ktokens",
    "storage_ktokens",
    "active",
)

# seconds below which an observed latency weighs as this much (a 0 s TTFT cannot be a ratio)
RELATIVE_FLOOR_S = 0.005


def _relative(seconds: float) -> float:
    """An observation's weight in a fit of relative errors."""
    return 1.0 / max(seconds, RELATIVE_FLOOR_S) ** 2


def ttft_features(fit: ForgettingRidge, shape: RequestShape) -> Vector:
    """`shape`'s TTFT features as a TTFT fit reads them: the pod computes the prompts ahead
    as it computes this one's, so the fit's cost per uncached token (told apart by cold and
    cached prompts, not by the queue) turns the time spent on them into tokens done. (Its
    own cost per token ahead would be circular: a low one reads every queue as done and is
    never corrected; in the simulator it fell so at 1 request/s.)"""
    return shape.ttft_features(float(fit.weights[1]))


@dataclass(frozen=True, slots=True)
class Prediction:
    """Predicted seconds to first token and per output token (None: not enough samples)."""

    ttft_s: float | None
    tpot_s: float | None


def relative_error(prediction: Prediction | None, observed_s: float) -> float | None:
    """|predicted - observed| / observed TTFT; None when nothing was predicted (or observed)."""
    if prediction is None or prediction.ttft_s is None or observed_s <= 0:
        return None
    return abs(prediction.ttft_s - observed_s) / observed_s


class PodLatencyModel:
    """The TTFT and TPOT fits of one pod serving in one mode (or of every pod: the prior)."""

    def __init__(self, forget: float = 0.98, prior: PodLatencyModel | None = None) -> None:
        # the fewest and most uncached prompt tokens a TTFT observation had: a prediction
        # outside is an extrapolation (a fit of short prompts says little of long ones, and one
        # of long prompts little of short ones: their fixed costs hide in the per-token term)
        self.min_uncached_tokens: int | None = None
        self.max_uncached_tokens = 0
        self.ttft: ForgettingRidge = ForgettingRidge(
            len(TTFT_FEATURES), forget, prior=prior.ttft if prior else None
        )
        self.tpot: ForgettingRidge = ForgettingRidge(2, forget, prior=prior.tpot if prior else None)
        # the decayed mean of (observed - predicted) TTFT, seconds, and the decayed count it is
        # divided by: the fit of relative errors predicts a typical answer, and this is what
        # the mean answer adds to it (`LatencyModels.mean_ttft_s`)
        self.forget = forget
        self._residual_sum = 0.0
        self._residual_count = 0.0

    @property
    def mean_residual_s(self) -> float:
        """Seconds the mean observed TTFT lay above the prediction, lately (0 before any)."""
        return self._residual_sum / self._residual_count if self._residual_count else 0.0

    def observe(self, shape: RequestShape, ttft_s: float | None, tpot_s: float | None) -> None:
        if ttft_s is not None:
            features = ttft_features(self.ttft, shape)
            if self.ttft.num_samples:
                residual = ttft_s - max(0.0, self.ttft.predict(features))
                self._residual_sum = self.forget * self._residual_sum + residual
                self._residual_count = self.forget * self._residual_count + 1.0
            self.ttft.update(features, ttft_s, _relative(ttft_s))
            self.max_uncached_tokens = max(self.max_uncached_tokens, shape.uncached_tokens)
            least = self.min_uncached_tokens
            if least is None or shape.uncached_tokens < least:
                self.min_uncached_tokens = shape.uncached_tokens
        if tpot_s is not None:
            self.tpot.update(shape.tpot_features(), tpot_s, _relative(tpot_s))


class LatencyModels:
    """Every pod's models, by (pod, mode), and per mode the cluster's: one fit of every pod's
    observations, each pod's prior. A pod predicts from its first request on (with the
    cluster's fit until its own observations move it); nothing is predicted in a mode until
    the cluster has `min_samples` observations of it."""

    def __init__(self, min_samples: int = 8, forget: float = 0.98) -> None:
        self.min_samples = min_samples
        self.forget = forget
        self._models: dict[tuple[str, str], PodLatencyModel] = {}
        self._cluster: dict[str, PodLatencyModel] = {}

    def model(self, pod: str, mode: ServeMode) -> PodLatencyModel:
        key = (pod, self._checked(mode))
        if key not in self._models:
            self._models[key] = PodLatencyModel(self.forget, prior=self.cluster(mode))
        return self._models[key]

    def cluster(self, mode: ServeMode) -> PodLatencyModel:
        """The fit of every pod's observations in `mode`: each pod's prior. The decode
        mode's own prior is the direct mode's fit: a P/D decode waits behind the work ahead
        of it on its pod as any request there does, yet most P/D decodes are of long prompts,
        which reach the pod once that work is done (`RequestShape.after_prefill`), so the
        cost per token ahead is seldom seen in the mode (a short prompt's decode behind a
        long prompt was predicted at 0.25 s and took 0.35-0.7 s)."""
        mode = self._checked(mode)
        if mode not in self._cluster:
            prior = self.cluster("direct") if mode == "decode" else None
            self._cluster[mode] = PodLatencyModel(self.forget, prior=prior)
        return self._cluster[mode]

    @staticmethod
    def _checked(mode: str) -> ServeMode:
        if mode not in SERVE_MODES:
            raise ValueError(f"unknown serve mode {mode!r}; one of {SERVE_MODES}")
        return mode

    def predict(self, pod: str, mode: ServeMode, shape: RequestShape) -> Prediction:
        cluster = self._cluster.get(self._checked(mode))
        if cluster is None:
            return Prediction(None, None)
        own = self._models.get((pod, mode))
        ttft = tpot = None
        fit = self._ttft_fit(pod, mode)
        if fit is not None:
            # a latency is never below zero; a young fit can extrapolate there
            ttft = max(0.0, fit.predict(ttft_features(fit, shape)))
        if cluster.tpot.num_samples >= self.min_samples:
            fit = own.tpot if own is not None and own.tpot.num_samples else cluster.tpot
            tpot = max(0.0, fit.predict(shape.tpot_features()))
        return Prediction(ttft, tpot)

    def mean_ttft_s(self, pod: str, mode: ServeMode, shape: RequestShape) -> float | None:
        """The request's *mean* TTFT on `pod` in `mode`: the prediction plus what answers
        there lately took above their predictions on average (None while the mode is cold).
        The fit of relative errors predicts the typical answer, which is what an SLO is judged
        by; a choice between ways of serving that minimises the mean TTFT must weigh their
        tails too. A P/D decode on this project's CPU box answers in 40 ms typically and in
        1-2 s when its pull is starved by the prefill pod's next prompt: the typical
        prediction made P/D look 0.3 s cheaper than it was (bench_pd_mix.py)."""
        model = self._ttft_model(pod, mode)
        if model is None:
            return None
        prediction = max(0.0, model.ttft.predict(ttft_features(model.ttft, shape)))
        return max(0.0, prediction + model.mean_residual_s)

    def prompt_work_s(self, pod: str, mode: ServeMode, shape: RequestShape) -> float | None:
        """Seconds of the pod's time that the request's own prompt takes (the TTFT fit's
        per-token terms: its uncached and cached tokens, not the queue ahead or the batch):
        how long it holds back what comes after it. None while the mode is cold."""
        fit = self._ttft_fit(pod, mode)
        if fit is None:
            return None
        own = shape.alone().ttft_features()
        return float(fit.weights[1:] @ own[1:])

    def _ttft_fit(self, pod: str, mode: ServeMode) -> ForgettingRidge | None:
        """The pod's TTFT fit in `mode` (the cluster's until it has its own observations);
        None until the cluster has `min_samples` of the mode."""
        model = self._ttft_model(pod, mode)
        return model.ttft if model is not None else None

    def _ttft_model(self, pod: str, mode: ServeMode) -> PodLatencyModel | None:
        """The model whose TTFT fit predicts for the pod in `mode` (`_ttft_fit`)."""
        cluster = self._cluster.get(self._checked(mode))
        if cluster is None or cluster.ttft.num_samples < self.min_samples:
            return None
        own = self._models.get((pod, mode))
        return own if own is not None and own.ttft.num_samples else cluster

    def observe(
        self,
        pod: str,
        mode: ServeMode,
        shape: RequestShape,
        ttft_s: float | None,
        tpot_s: float | None,
    ) -> None:
        self.cluster(mode).observe(shape, ttft_s, tpot_s)
        self.model(pod, mode).observe(shape, ttft_s, tpot_s)

    def has_seen(self, mode: ServeMode, uncached_tokens: int) -> bool:
        """The cluster observed TTFTs in `mode` with as few and as many uncached tokens: a
        prediction for the request interpolates rather than extrapolates."""
        cluster = self._cluster.get(self._checked(mode))
        if cluster is None or cluster.min_uncached_tokens is None:
            return False
        return cluster.min_uncached_tokens <= uncached_tokens <= cluster.max_uncached_tokens

    def forget_pod(self, pod: str) -> None:
        """Drop a pod's models (it left: a new pod at that URL may be another machine)."""
        for key in [k for k in self._models if k[0] == pod]:
            del self._models[key]

    def samples(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(pod, mode) -> (TTFT samples, TPOT samples)."""
        return {k: (m.ttft.num_samples, m.tpot.num_samples) for k, m in self._models.items()}
