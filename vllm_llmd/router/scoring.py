"""Which pod gets a request: routing policies behind one interface, built by name.

Every policy answers `choose(ScoreInput) -> Decision`. The input is what the router knows at
that moment: the request's number of full blocks, each candidate pod's cached prefix (from the
index), each pod's load (scraped gauges plus the router's in-flight count) and the candidates
themselves (healthy pods of the right role; the router filters, policies never do). The output
names the pod, a one-line reason, every candidate's score (higher is better) and the chosen
pod's cached blocks, so the router can log why.

Policies (`make_policy(name, config)`):

- `round_robin`: the next pod id after the last one chosen, in sorted order, wrapping around.
  Ignores cache and load; a baseline.
- `load`: the least loaded pod, compared in order by waiting requests, then running plus
  in-flight requests, then KV-cache usage. Scores are minus the pod's rank (0 for the best).
- `prefix`: the longest cached prefix, weighted by tier: each cached block counts
  `tier_weights[tier]` (GPU 1.0, CPU 0.8, STORAGE 0.5, SHARED 0.4 by default; an unknown tier
  0), and the score is that sum over the request's blocks (0..1). Ties go to the less loaded
  pod.
  Ignores saturation; a baseline.
- `kv_aware` (default): `w_prefix * prefix_score - w_load * load_score`, where `load_score` is
  the larger of the pod's KV usage and its requests (waiting + running + in-flight) divided by
  the busiest candidate's (never by less than `pressure_floor`), so both lie in 0..1. A pod is
  saturated when waiting >= `max_waiting` or KV usage >= `max_kv_usage`; saturated pods are
  left out while any candidate is not, so a hot cache never draws load onto a full pod. When
  all are saturated the least loaded pod (as `load`) wins.
- `slo`: routes on each pod's predicted TTFT/TPOT against the request's SLOs, and queues or
  sheds what no pod can serve in time (`predictive.py`, `slo.py`). The policy object built here
  is its heuristic fallback (kv_aware), used while the latency models are cold.

Ties that remain go to the smallest pod id, so equal inputs always give equal decisions.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from vllm_llmd.router.load import PodLoad

# SHARED (the LMCache tier every pod can load from) is below a pod's own disk: a load crosses
# a server (and maybe Redis). It scores alike on every pod connected to it, so it never pulls
# a request to one pod; it only keeps a pod's own slower copy from looking better than it is.
DEFAULT_TIER_WEIGHTS = {"GPU": 1.0, "CPU": 0.8, "STORAGE": 0.5, "SHARED": 0.4}
_NO_LOAD = PodLoad()


class PolicyName(str, enum.Enum):
    """The routing policies `make_policy` builds."""

    ROUND_ROBIN = "round_robin"
    LOAD = "load"
    PREFIX = "prefix"
    KV_AWARE = "kv_aware"
    SLO = "slo"


@dataclass(frozen=True, slots=True)
class PodCache:
    """What one pod holds of a request: its longest consecutive cached prefix."""

    # leading blocks of the request the pod has cached, in a row
    num_blocks: int = 0
    # the best tier holding each of those blocks ("GPU" > "CPU" > "STORAGE" > "SHARED")
    tiers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.num_blocks != len(self.tiers):
            raise ValueError(f"{self.num_blocks} cached blocks but {len(self.tiers)} tiers")


@dataclass(frozen=True, slots=True)
class ScoreInput:
    """Everything a policy may look at for one request."""

    # full blocks of the request's prompt (its hashes' count)
    num_blocks: int
    # pods that may take the request (healthy, right role); must not be empty
    candidates: Sequence[str]
    # per pod, from the index; a missing pod has nothing cached
    caches: Mapping[str, PodCache] = field(default_factory=dict)
    # per pod; a missing pod counts as idle (no scrape yet)
    loads: Mapping[str, PodLoad] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.candidates:
            raise ValueError("no candidate pods to choose from")
        if self.num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {self.num_blocks}")

    def cache(self, pod: str) -> PodCache:
        return self.caches.get(pod) or PodCache()

    def load(self, pod: str) -> PodLoad:
        return self.loads.get(pod) or _NO_LOAD


@dataclass(frozen=True, slots=True)
class Decision:
    """A policy's choice and why."""

    pod: str
    reason: str
    # every candidate's score under the policy (higher is better)
    scores: dict[str, float]
    # the chosen pod's cached prefix, in blocks
    hit_blocks: int


@dataclass(frozen=True)
class ScoringConfig:
    """Knobs of the policies (see the module docstring for where each one acts)."""

    # weight of a cached block by the tier it is in; other tiers weigh 0
    tier_weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_TIER_WEIGHTS))
    # kv_aware: score = w_prefix * prefix_score - w_load * load_score
    w_prefix: float = 1.0
    w_load: float = 0.5
    # kv_aware: a pod with this many waiting requests, or this KV usage, is saturated
    max_waiting: int = 8
    max_kv_usage: float = 0.95
    # kv_aware: requests are normalized by max(busiest candidate's, this), so one request
    # against none does not read as busy against idle
    pressure_floor: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "tier_weights", MappingProxyType(dict(self.tier_weights)))
        if any(w < 0 for w in self.tier_weights.values()):
            raise ValueError(f"tier weights must be >= 0: {dict(self.tier_weights)}")
        if self.w_prefix < 0 or self.w_load < 0:
            raise ValueError("w_prefix and w_load must be >= 0")
        if self.max_waiting < 1 or not 0 < self.max_kv_usage <= 1 or self.pressure_floor < 1:
            raise ValueError("need max_waiting >= 1, 0 < max_kv_usage <= 1, pressure_floor >= 1")


class ScoringPolicy(ABC):
    """Chooses one pod among the candidates for a request."""

    name: str

    @abstractmethod
    def choose(self, request: ScoreInput) -> Decision:
        """The chosen pod, with the reason and each candidate's score."""


# ---- shared measures ----------------------------------------------------------------------


def load_key(load: PodLoad) -> tuple[int, int, float]:
    """Least-loaded order: waiting, then running + in-flight, then KV usage (smaller wins)."""
    return (load.num_waiting, load.num_active, load.kv_usage)


def prefix_score(cache: PodCache, num_blocks: int, tier_weights: Mapping[str, float]) -> float:
    """The tier-weighted share of the request's blocks the pod has cached, 0..1."""
    if num_blocks == 0:
        return 0.0
    hit = min(cache.num_blocks, num_blocks)
    return sum(tier_weights.get(tier, 0.0) for tier in cache.tiers[:hit]) / num_blocks


def _least_loaded(request: ScoreInput, pods: Sequence[str]) -> list[str]:
    return sorted(pods, key=lambda pod: (load_key(request.load(pod)), pod))


def _describe_load(load: PodLoad) -> str:
    return (
        f"waiting={load.num_waiting} running={load.num_running} "
        f"in_flight={load.num_in_flight} kv={load.kv_usage:.2f}"
    )


def _describe_cache(cache: PodCache, num_blocks: int) -> str:
    counts: dict[str, int] = {}
    for tier in cache.tiers:
        counts[tier] = counts.get(tier, 0) + 1
    order = list(DEFAULT_TIER_WEIGHTS)  # fastest first, then unknown tiers by name
    ranked = sorted(counts, key=lambda t: (order.index(t) if t in order else len(order), t))
    tiers = ", ".join(f"{tier} {counts[tier]}" for tier in ranked)
    return f"{cache.num_blocks}/{num_blocks} blocks cached" + (f" ({tiers})" if tiers else "")


# ---- policies -----------------------------------------------------------------------------


class RoundRobinPolicy(ScoringPolicy):
    """The next pod id after the last one chosen (sorted, wrapping)."""

    name = PolicyName.ROUND_ROBIN.value

    def __init__(self) -> None:
        self._last: str | None = None

    def choose(self, request: ScoreInput) -> Decision:
        pods = sorted(request.candidates)
        pod = next((p for p in pods if self._last is not None and p > self._last), pods[0])
        self._last = pod
        scores = {p: float(p == pod) for p in request.candidates}
        return Decision(pod, "round robin", scores, request.cache(pod).num_blocks)


class LeastLoadedPolicy(ScoringPolicy):
    """The least loaded pod (`load_key`)."""

    name = PolicyName.LOAD.value

    def choose(self, request: ScoreInput) -> Decision:
        ranked = _least_loaded(request, request.candidates)
        pod = ranked[0]
        scores = {p: -float(rank) for rank, p in enumerate(ranked)}
        reason = f"least loaded: {_describe_load(request.load(pod))}"
        return Decision(pod, reason, scores, request.cache(pod).num_blocks)


class PrefixPolicy(ScoringPolicy):
    """The longest tier-weighted cached prefix; ties to the less loaded pod."""

    name = PolicyName.PREFIX.value

    def __init__(self, config: ScoringConfig) -> None:
        self.config = config

    def choose(self, request: ScoreInput) -> Decision:
        weights = self.config.tier_weights
        scores = {
            p: prefix_score(request.cache(p), request.num_blocks, weights)
            for p in request.candidates
        }
        best = max(scores.values())
        pod = _least_loaded(request, [p for p, s in scores.items() if s == best])[0]
        cache = request.cache(pod)
        reason = f"longest prefix: {_describe_cache(cache, request.num_blocks)}, score {best:.3f}"
        return Decision(pod, reason, scores, cache.num_blocks)


class KVAwarePolicy(ScoringPolicy):
    """Cached prefix against load, never onto a saturated pod while another is free."""

    name = PolicyName.KV_AWARE.value

    def __init__(self, config: ScoringConfig) -> None:
        self.config = config

    def is_saturated(self, load: PodLoad) -> bool:
        """Waiting >= max_waiting or KV usage >= max_kv_usage."""
        config = self.config
        return load.num_waiting >= config.max_waiting or load.kv_usage >= config.max_kv_usage

    def load_scores(self, request: ScoreInput) -> dict[str, float]:
        """Each candidate's load in 0..1: max(KV usage, requests / busiest candidate's)."""
        pressure = {p: _pressure(request.load(p)) for p in request.candidates}
        scale = max(self.config.pressure_floor, *pressure.values())
        return {p: max(request.load(p).kv_usage, pressure[p] / scale) for p in pressure}

    def choose(self, request: ScoreInput) -> Decision:
        config = self.config
        loads = self.load_scores(request)
        scores = {
            p: config.w_prefix
            * prefix_score(request.cache(p), request.num_blocks, config.tier_weights)
            - config.w_load * loads[p]
            for p in request.candidates
        }
        free = [p for p in request.candidates if not self.is_saturated(request.load(p))]
        if not free:
            pod = _least_loaded(request, request.candidates)[0]
            reason = (
                f"all {len(scores)} candidates saturated; least loaded: "
                f"{_describe_load(request.load(pod))}"
            )
            return Decision(pod, reason, scores, request.cache(pod).num_blocks)
        best = max(scores[p] for p in free)
        pod = _least_loaded(request, [p for p in free if scores[p] == best])[0]
        cache = request.cache(pod)
        reason = (
            f"kv_aware: {_describe_cache(cache, request.num_blocks)}, load {loads[pod]:.2f}, "
            f"score {best:.3f}"
        )
        skipped = sorted(p for p in request.candidates if p not in free and scores[p] > best)
        if skipped:
            reason += f"; skipped saturated {', '.join(skipped)}"
        return Decision(pod, reason, scores, cache.num_blocks)


class SLOFallbackPolicy(KVAwarePolicy):
    """The `slo` policy's choice while its latency models are cold: kv_aware's."""

    name = PolicyName.SLO.value


def _pressure(load: PodLoad) -> int:
    return load.num_waiting + load.num_running + load.num_in_flight


def make_policy(
    name: str | PolicyName = PolicyName.KV_AWARE, config: ScoringConfig | None = None
) -> ScoringPolicy:
    """Build the policy called `name` ("round_robin", "load", "prefix", "kv_aware", "slo")."""
    try:
        policy = PolicyName(name)
    except ValueError:
        known = ", ".join(p.value for p in PolicyName)
        raise ValueError(f"unknown routing policy {name!r}; choose one of {known}") from None
    config = config or ScoringConfig()
    if policy is PolicyName.ROUND_ROBIN:
        return RoundRobinPolicy()
    if policy is PolicyName.LOAD:
        return LeastLoadedPolicy()
    if policy is PolicyName.PREFIX:
        return PrefixPolicy(config)
    if policy is PolicyName.SLO:
        return SLOFallbackPolicy(config)
    return KVAwarePolicy(config)
