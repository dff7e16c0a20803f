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
  saturated when waiting >= `max_waiting` or KV usage >= `max_kv_usage`, or for this request
  when its KV cache has no room for it beside the router's requests in flight there
  (`ScoreInput.full`; where that is counted, it replaces the KV-usage threshold:
  `kv_gauge_full`); saturated pods are left out while any candidate is not, so a hot cache
  never draws load onto a full pod. When all are saturated the least loaded pod (as `load`)
  wins.
- `slo`: routes on each pod's predicted TTFT/TPOT against the request's SLOs, and queues or
  sheds what no pod can serve in time (`predictive.py`, `slo.py`). The policy object built here
  is its heuristic fallback (kv_aware), used while the latency models are cold.

Ties that remain go to the smallest pod id, so equal inputs always give equal decisions.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from bisect import bisect_right
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
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


_NO_CACHE = PodCache()  # what a pod without a hit holds (one instance: made per request before)


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
    # pods whose KV cache has no room for the request now (`PodState.lacks_room`): saturated
    # for it, whatever their gauges say
    full: frozenset[str] = frozenset()
    # room was counted for this request (--kv-room): on a pod of known size where the router
    # holds blocks, `full` replaces the KV-usage gauge's threshold (`kv_gauge_full`)
    kv_room: bool = False

    def __post_init__(self) -> None:
        if not self.candidates:
            raise ValueError("no candidate pods to choose from")
        if self.num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {self.num_blocks}")

    def cache(self, pod: str) -> PodCache:
        return self.caches.get(pod) or _NO_CACHE

    def load(self, pod: str) -> PodLoad:
        return self.loads.get(pod) or _NO_LOAD

    def candidate_loads(self) -> dict[str, PodLoad]:
        """`load(pod)` of every candidate, in candidate order (one dict look-up each)."""
        loads = self.loads
        return {p: loads.get(p) or _NO_LOAD for p in self.candidates}


def kv_gauge_full(load: PodLoad, max_kv_usage: float, kv_room: bool) -> bool:
    """The pod's KV-usage gauge says it is full. Where the router counts room (`kv_room`), the
    pod's size is known and the router holds blocks there, its own count decides instead
    (`ScoreInput.full`): the gauge lags a scrape and knows nothing of the request, so it would
    turn away a request whose prompt is held there and needs one or two new blocks, to be
    computed whole on another pod. Where the router holds nothing, the gauge (other routers'
    requests, or ones just ended) is all there is."""
    if load.kv_usage < max_kv_usage:
        return False
    return not (kv_room and load.kv_blocks and load.held_blocks)


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
    if num_blocks == 0 or cache.num_blocks == 0:  # most pods, at scale: nothing cached
        return 0.0
    hit = min(cache.num_blocks, num_blocks)
    weights = map(tier_weights.get, cache.tiers[:hit], repeat(0.0))  # tier_weights.get(tier, 0.0)
    return sum(weights) / num_blocks


def _least_loaded(request: ScoreInput, pods: Sequence[str]) -> list[str]:
    return sorted(pods, key=lambda pod: (load_key(request.load(pod)), pod))


def _describe_load(load: PodLoad) -> str:
    return (
        f"waiting={load.num_waiting} running={load.num_running} "
        f"in_flight={load.num_in_flight} kv={load.kv_usage:.2f}"
    )


def _describe_cache(cache: PodCache, num_blocks: int) -> str:
    counts = Counter(cache.tiers)  # counted in C: a hit is ~100 blocks, on every decision
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
        # the first pod id after the last one chosen (a binary search: 256 pods add up)
        after = bisect_right(pods, self._last) if self._last is not None else len(pods)
        pod = pods[after] if after < len(pods) else pods[0]
        self._last = pod
        scores = dict.fromkeys(request.candidates, 0.0)
        scores[pod] = 1.0
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
        # prefix_score is 0.0 without a hit: only the pods with one (a few, at scale) need it
        scores = dict.fromkeys(request.candidates, 0.0)
        for pod, cache in request.caches.items():
            if pod in scores:
                scores[pod] = prefix_score(cache, request.num_blocks, weights)
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

    def is_saturated(self, load: PodLoad, kv_room: bool = False) -> bool:
        """Waiting >= max_waiting or KV usage >= max_kv_usage (`kv_gauge_full`)."""
        config = self.config
        return load.num_waiting >= config.max_waiting or kv_gauge_full(
            load, config.max_kv_usage, kv_room
        )

    def load_scores(
        self, request: ScoreInput, pod_loads: Mapping[str, PodLoad] | None = None
    ) -> dict[str, float]:
        """Each candidate's load in 0..1: max(KV usage, requests / busiest candidate's)."""
        if pod_loads is None:
            pod_loads = request.candidate_loads()
        # a pod's requests: waiting + running + in flight (inline: 256 pods a decision)
        pressures = [
            load.num_waiting + load.num_running + load.num_in_flight for load in pod_loads.values()
        ]
        scale = max(self.config.pressure_floor, *pressures)
        scores = {}
        for (pod, load), pressure in zip(pod_loads.items(), pressures, strict=True):
            kv, share = load.kv_usage, pressure / scale
            scores[pod] = kv if kv >= share else share  # max(kv, share), without a call
        return scores

    def choose(self, request: ScoreInput) -> Decision:
        # Every candidate gets a score (the decision reports them all), so this is O(pods) per
        # request, and at 256 pods it is most of the router's decision time: one pass per
        # measure, no method call per pod, and prefix_score only for pods with a hit (a few,
        # at scale). Candidates are taken once each, in order (a repeated one scores alike).
        config = self.config
        pod_loads = request.candidate_loads()
        loads = self.load_scores(request, pod_loads)
        w_prefix, w_load = config.w_prefix, config.w_load
        no_hit = w_prefix * 0.0  # the prefix term of a pod without a hit (prefix_score's 0.0)
        scores = {pod: no_hit - w_load * load for pod, load in loads.items()}
        for pod, cache in request.caches.items():
            if pod in scores:
                prefix = prefix_score(cache, request.num_blocks, config.tier_weights)
                scores[pod] = w_prefix * prefix - w_load * loads[pod]
        max_waiting, max_kv_usage = config.max_waiting, config.max_kv_usage
        kv_room = request.kv_room
        saturated = {  # is_saturated, inline (kv_gauge_full called only for a pod past the mark)
            pod
            for pod, load in pod_loads.items()
            if load.num_waiting >= max_waiting
            or (load.kv_usage >= max_kv_usage and kv_gauge_full(load, max_kv_usage, kv_room))
        }
        if request.full:
            saturated.update(request.full.intersection(pod_loads))
        if len(saturated) == len(pod_loads):
            pod = _least_loaded(request, request.candidates)[0]
            reason = (
                f"all {len(scores)} candidates saturated; least loaded: "
                f"{_describe_load(request.load(pod))}"
            )
            return Decision(pod, reason, scores, request.cache(pod).num_blocks)
        free = scores  # the scores of the pods that are not saturated
        if saturated:
            free = {pod: score for pod, score in scores.items() if pod not in saturated}
        best = max(free.values())
        pod = _least_loaded(request, [p for p, score in free.items() if score == best])[0]
        cache = request.cache(pod)
        reason = (
            f"kv_aware: {_describe_cache(cache, request.num_blocks)}, load {loads[pod]:.2f}, "
            f"score {best:.3f}"
        )
        if saturated:
            skipped = sorted(p for p in request.candidates if p in saturated and scores[p] > best)
            if skipped:
                reason += f"; skipped saturated {', '.join(skipped)}"
        return Decision(pod, reason, scores, cache.num_blocks)


class SLOFallbackPolicy(KVAwarePolicy):
    """The `slo` policy's choice while its latency models are cold: kv_aware's."""

    name = PolicyName.SLO.value


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
