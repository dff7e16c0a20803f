"""`ForgettingRidge`: the least-squares fit behind every latency model (`latency.py`).

Exponentially weighted (old observations fade), pulled toward prior weights (another fit's:
what the data leaves open stays there), weighted per observation (the latency models give
1/y²: relative errors), with every cost kept >= 0, and forgetting faster while its misses
lean one way. No history is kept: a k x k system (k <= 6) is solved when the weights are
first read after an observation.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["DRIFT_DECAY", "DRIFT_LIMIT", "DRIFT_SHRINK", "ForgettingRidge", "Vector"]

# a feature vector, or the model's weights
Vector = npt.NDArray[np.float64]

# a fit whose recent misses lean one way forgets faster (ForgettingRidge._follow_drift): the
# decay of their mean (~10 observations), how far it may lean, and what old observations keep
DRIFT_DECAY = 0.9
DRIFT_LIMIT = 0.7
DRIFT_SHRINK = 0.5


class ForgettingRidge:
    """Exponentially weighted least squares pulled toward prior weights.

    The fit minimises  sum_i forget^(n-i) * (y_i - w.x_i)^2 + sum_k s_k * (w_k - prior_k)^2,
    solved afresh (a k x k system, k <= 6) when first used after an observation. Unlike recursive
    least squares it cannot wind up: a direction the data does not excite (one prompt length,
    so uncached + cached tokens is constant; a queue that is always empty) stays at the prior
    instead of drifting to any value that fits, and the fit is well posed from the first
    observation. The prior is another fit's weights (a pod's prior is the cluster's), read
    when this fit is solved. Coefficients past the first (costs per token, per queued or
    running request) are kept >= 0: a cost is never negative. `strength` is worth a tenth of
    one observation: it decides only what the data leaves open. An observation may carry a
    weight (its share of the squares: `PodLatencyModel` gives 1/y², relative errors); the
    prior's pull on each weight (`_strengths`) scales with the observations' mean weight in
    that feature's direction, so it stays worth a tenth of one whatever their scale.
    """

    def __init__(
        self,
        num_features: int,
        forget: float = 0.98,
        strength: float = 0.1,
        prior: ForgettingRidge | None = None,
    ) -> None:
        if not 0.5 < forget <= 1.0:
            raise ValueError(f"forget must be in (0.5, 1], got {forget}")
        if strength <= 0:
            raise ValueError(f"strength must be > 0, got {strength}")
        self.forget = forget
        self.strength = strength
        self._r: Vector = np.zeros((num_features, num_features))
        self._b: Vector = np.zeros(num_features)
        # the observations' weights and count, decayed as _r and _b are: their mean weight
        self._weight_sum = 0.0
        self._count = 0.0
        # decayed mean of the recent signed misses (`_follow_drift`)
        self._drift = 0.0
        # the fit whose weights are the prior (read when this one is solved); None: zeros
        self.prior = prior
        self._weights: Vector | None = np.zeros(num_features)  # None: solve before use
        self.num_samples = 0

    @property
    def weights(self) -> Vector:
        """The fitted weights (solved when first asked for after a change)."""
        if self._weights is None:
            self._weights = self._solve()
        return self._weights

    def predict(self, x: Vector) -> float:
        return float(self.weights @ x)

    def update(self, x: Vector, y: float, weight: float = 1.0) -> None:
        if not weight > 0:
            raise ValueError(f"an observation's weight must be > 0, got {weight}")
        if self.num_samples:
            self._follow_drift(float(self.weights @ x), y)
        self._r = self.forget * self._r + weight * np.outer(x, x)
        self._b = self.forget * self._b + weight * x * y
        self._weight_sum = self.forget * self._weight_sum + weight
        self._count = self.forget * self._count + 1.0
        self.num_samples += 1
        self._weights = None

    def _follow_drift(self, predicted: float, y: float) -> None:
        """Forget faster while the fit keeps missing one way. The forgetting factor follows a
        change within ~1/(1-forget) observations only when they weigh alike; weighted by 1/y²,
        a pod that answered in 5 ms and now takes 2 s holds 160,000 times the weight in its
        old answers, and would be believed after hundreds. So when the last few misses (their
        decayed mean, each a signed share of the larger of prediction and outcome) lean one
        way past DRIFT_LIMIT, what was learned before counts half as much, each time, until
        the fit catches up."""
        miss = (y - predicted) / max(abs(y), abs(predicted), 1e-9)
        self._drift = DRIFT_DECAY * self._drift + (1.0 - DRIFT_DECAY) * miss
        if abs(self._drift) > DRIFT_LIMIT:
            self._r *= DRIFT_SHRINK
            self._b *= DRIFT_SHRINK
            self._weight_sum *= DRIFT_SHRINK
            self._count *= DRIFT_SHRINK

    def _strengths(self) -> Vector:
        """The prior's pull on each weight: a tenth of one mean observation in that feature's
        direction (the decayed mean of x_k² times the weight). One strength for all weights,
        scaled by the mean weight, was worth a tenth of a mean observation only where the
        mean observation was: weighted by 1/y², it is a fast answer, so a feature excited only
        by slow ones (a tier loaded from disk, a long cold prompt) had the prior outweigh
        dozens of them, and its cost was fitted 30% low. A feature never excited keeps a small
        pull (a thousandth of the mean weight), which holds it at the prior."""
        if not self._count:
            return np.full(len(self._b), self.strength)
        floor = 1e-3 * self._weight_sum / self._count
        return self.strength * np.maximum(np.diag(self._r) / self._count, floor)

    def _solve(self) -> Vector:
        """The regularised fit with every cost >= 0: a cost that comes out negative is held at
        0 and the others fitted again without it (an active set; at most k rounds)."""
        k = len(self._b)
        prior = self.prior.weights if self.prior is not None else np.zeros(k)
        strengths = self._strengths()
        r = self._r + np.diag(strengths)
        rhs = self._b + strengths * prior
        weights: Vector = np.asarray(np.linalg.solve(r, rhs), dtype=np.float64)
        free = np.ones(k, dtype=bool)
        for _ in range(k - 1):  # rarely: only when a cost came out negative
            negative = np.flatnonzero(weights[1:] < 0) + 1
            if not len(negative):
                break
            free[negative] = False
            weights = np.zeros(k)
            weights[free] = np.linalg.solve(r[np.ix_(free, free)], rhs[free])
        weights[1:] = np.maximum(weights[1:], 0.0)
        return weights
