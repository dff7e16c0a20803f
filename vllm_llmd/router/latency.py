"""Per-pod latency models, learned online from what the router observes.

For every pod and every way it serves (`direct`: prompt and decode on one pod, `prefill`: the
prompt half of a P/D pair, `decode`: the decode half, whose prompt arrives by transfer), the
router keeps two small linear models:

    TTFT  ~ a + b * uncached_ktokens + c * cached_ktokens + d * waiting + e * active
    TPOT  ~ a + b * active

`uncached_ktokens` are the prompt tokens the pod must compute (thousands), `cached_ktokens` the
ones its cache (or a transfer) provides, `waiting` its queue and `active` its running batch plus
the router's in-flight requests, all as the router saw them at dispatch. Prefill cost is close to
linear in uncached tokens, queueing adds roughly one step per queued request, and a decode step
slows with the batch: a line per term is enough to rank pods and to tell whether an SLO can be
met, and every coefficient reads as "seconds per unit", so an operator can check it.

Fitting is recursive least squares with a forgetting factor: O(features²) per observation, no
history kept, and old behaviour fades (a pod that got slower is believed within ~1/(1-forget)
requests). Until a model has `min_samples` observations it predicts nothing and the router falls
back to its heuristic policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

# a feature vector, or the model's weights
Vector = npt.NDArray[np.float64]

# how a pod serves a request: all of it, or one half of a P/D pair
ServeMode = Literal["direct", "prefill", "decode"]
SERVE_MODES: tuple[ServeMode, ...] = get_args(ServeMode)


@dataclass(frozen=True, slots=True)
class RequestShape:
    """What the router knows about a request and a pod at dispatch."""

    uncached_tokens: int
    cached_tokens: int
    waiting: int
    active: int

    def ttft_features(self) -> Vector:
        return np.array(
            [
                1.0,
                self.uncached_tokens / 1000.0,
                self.cached_tokens / 1000.0,
                float(self.waiting),
                float(self.active),
            ]
        )

    def tpot_features(self) -> Vector:
        return np.array([1.0, float(self.active)])


class OnlineLeastSquares:
    """Recursive least squares with exponential forgetting (and a ridge start)."""

    def __init__(self, num_features: int, forget: float = 0.98, ridge: float = 1e-3) -> None:
        if not 0.5 < forget <= 1.0:
            raise ValueError(f"forget must be in (0.5, 1], got {forget}")
        self.forget = forget
        self.weights: Vector = np.zeros(num_features)
        # inverse of the (ridge-started) information matrix
        self._p: Vector = np.eye(num_features) / ridge
        self.num_samples = 0

    def predict(self, x: Vector) -> float:
        return float(self.weights @ x)

    def update(self, x: Vector, y: float) -> None:
        px = self._p @ x
        gain = px / (self.forget + x @ px)
        self.weights = self.weights + gain * (y - self.weights @ x)
        self._p = (self._p - np.outer(gain, px)) / self.forget
        self.num_samples += 1


@dataclass(frozen=True, slots=True)
class Prediction:
    """Predicted seconds to first token and per output token (None: not enough samples)."""

    ttft_s: float | None
    tpot_s: float | None


class PodLatencyModel:
    """The TTFT and TPOT models of one pod serving in one mode."""

    def __init__(self, min_samples: int = 8, forget: float = 0.98) -> None:
        self.min_samples = min_samples
        self.ttft = OnlineLeastSquares(5, forget)
        self.tpot = OnlineLeastSquares(2, forget)

    def predict(self, shape: RequestShape) -> Prediction:
        ttft = tpot = None
        if self.ttft.num_samples >= self.min_samples:
            # a latency is never below zero; a young fit can extrapolate there
            ttft = max(0.0, self.ttft.predict(shape.ttft_features()))
        if self.tpot.num_samples >= self.min_samples:
            tpot = max(0.0, self.tpot.predict(shape.tpot_features()))
        return Prediction(ttft, tpot)

    def observe(self, shape: RequestShape, ttft_s: float | None, tpot_s: float | None) -> None:
        if ttft_s is not None:
            self.ttft.update(shape.ttft_features(), ttft_s)
        if tpot_s is not None:
            self.tpot.update(shape.tpot_features(), tpot_s)


class LatencyModels:
    """Every pod's models, by (pod, mode); created on first use."""

    def __init__(self, min_samples: int = 8, forget: float = 0.98) -> None:
        self.min_samples = min_samples
        self.forget = forget
        self._models: dict[tuple[str, str], PodLatencyModel] = {}

    def model(self, pod: str, mode: ServeMode) -> PodLatencyModel:
        if mode not in SERVE_MODES:
            raise ValueError(f"unknown serve mode {mode!r}; one of {SERVE_MODES}")
        key = (pod, mode)
        if key not in self._models:
            self._models[key] = PodLatencyModel(self.min_samples, self.forget)
        return self._models[key]

    def predict(self, pod: str, mode: ServeMode, shape: RequestShape) -> Prediction:
        return self.model(pod, mode).predict(shape)

    def observe(
        self,
        pod: str,
        mode: ServeMode,
        shape: RequestShape,
        ttft_s: float | None,
        tpot_s: float | None,
    ) -> None:
        self.model(pod, mode).observe(shape, ttft_s, tpot_s)

    def forget_pod(self, pod: str) -> None:
        """Drop a pod's models (it left: a new pod at that URL may be another machine)."""
        for key in [k for k in self._models if k[0] == pod]:
            del self._models[key]

    def samples(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(pod, mode) -> (TTFT samples, TPOT samples)."""
        return {k: (m.ttft.num_samples, m.tpot.num_samples) for k, m in self._models.items()}
