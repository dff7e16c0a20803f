"""The router inside the simulation: its real index, ingest path and routing policy, no I/O.

What the proxy does for a request, with the same objects (`router/proxy.py`):

    index.lookup_prefix(hashes)            the InMemoryIndex, fed by KV events
      + RecentRoutes.run_length(pod, ...)  prefixes routed in the last ttl, events not in yet
    routing.decide_route(...)              the policy (or the SLO planner) over caches and loads
                                           (pods where prefill pacing would hold a long prompt
                                           count as saturated for it: pacing.paced_pods)
    RecentRoutes.record(pod, hashes)       once it goes (`send`; a paced route waits: `paced`)

With `replicate_after`, each decision also goes to the router's `HotPrefixes`
(router/replication.py), as the proxy's does; a copy it plans is run by the simulation
(`take_copies`, then `copied` when the blocks are in).

And what its ingestor does with a pod's event batch: `ingest.apply_update` of a ReceivedBatch
(BlockStored -> index.add, BlockRemoved -> index.remove), after the publishing delay.

Loads are the router's view: the pods' gauges as last scraped (every `scrape_interval_s`, as
the pod registry polls /metrics) plus the router's exact in-flight count per pod. The
`round_robin` and `load` policies never read caches, so for them the lookup is skipped (it
changes no decision; it only costs the simulation time).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vllm_llmd.events.model import MEDIUM_GPU, EventBatch
from vllm_llmd.events.updates import ReceivedBatch
from vllm_llmd.router import routing
from vllm_llmd.router.event_apply import PodStats, apply_update
from vllm_llmd.router.index import InMemoryIndex
from vllm_llmd.router.latency import LatencyModels, relative_error
from vllm_llmd.router.load import ArrivalRate, PodLoad
from vllm_llmd.router.pacing import paced, paced_pods
from vllm_llmd.router.pod_spec import PodSpec
from vllm_llmd.router.pod_state import PodState, Sending, count_own_blocks, pods_without_room
from vllm_llmd.router.predictive import SLOPlanner
from vllm_llmd.router.recent import RecentRoutes
from vllm_llmd.router.replication import HotPrefixes, Replication
from vllm_llmd.router.scoring import PodCache, PolicyName, ScoringConfig, make_policy
from vllm_llmd.router.shared_view import extended
from vllm_llmd.router.slo import SLO, RequestClass

# policies whose choice never depends on the caches
_CACHE_BLIND = frozenset({PolicyName.ROUND_ROBIN.value, PolicyName.LOAD.value})


@dataclass(frozen=True)
class RouterSettings:
    """The router's flags that matter here (defaults: the router's own)."""

    policy: str = PolicyName.KV_AWARE.value
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    recent_route_ttl_s: float = 5.0
    index_max_entries: int = 1_000_000
    latency_min_samples: int = 8
    # the SLO every request carries (policy slo routes on it)
    slo: SLO = field(default_factory=SLO)
    slo_headroom: float = 0.1
    # seconds from a pod's engine step to its events in the index (publish, ZMQ, poll)
    event_delay_s: float = 0.02
    scrape_interval_s: float = 1.0
    # --replicate-hot-prefixes (0: off), --replicate-per-minute, and the prefix length worth a
    # copy (the router's --pd-threshold-tokens)
    replicate_after: int = 0
    replicate_per_minute: int = 60
    replicate_min_tokens: int = 256
    # --kv-room (the router's default)
    kv_room: bool = True
    # seconds the router spends on each request before its pod has it (parse, look-up,
    # decide, connect), one request at a time: requests that arrive together reach their pods
    # this far apart, and an idle pod starts its first step on the first alone, as a real one
    # does. 0: every request reaches its pod the instant it arrives
    dispatch_s: float = 0.0
    # --prefill-pace-tokens (router/pacing.py; not for round_robin). The simulation releases
    # a held request at the first token or end that makes room for it (the router also every
    # 20 ms, and any after 30 s)
    prefill_pace_tokens: int = 2048


class SimRouter:
    """One router over `pods`; the caller tells it what it sent, what ended and when to scrape."""

    def __init__(
        self,
        settings: RouterSettings,
        pods: Sequence[str],
        block_size: int,
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.pods = sorted(pods)
        self.index = InMemoryIndex(settings.index_max_entries)
        policy = make_policy(settings.policy, settings.scoring)
        self.latency = LatencyModels(settings.latency_min_samples)
        planner = None
        if settings.policy == PolicyName.SLO.value:
            planner = SLOPlanner(
                self.latency, policy, settings.scoring, block_size, settings.slo_headroom
            )
        # P/D is not simulated: every pod serves both halves, none is a prefill pod
        self.routing = routing.RoutingPolicy(
            policy, planner, self.latency, block_size, 1 << 62, kv_room=settings.kv_room
        )
        # the latency models learn, and their predictions are scored (policy slo only)
        self.learns = planner is not None
        self.request_class = RequestClass(settings.slo)
        ttl = settings.recent_route_ttl_s
        self.recent = RecentRoutes(ttl, clock=clock) if ttl > 0 else None
        # first block hash -> pods it was routed to: only they can have a recent run (a
        # shortcut around asking RecentRoutes about every pod; same answers)
        self._routed_first: dict[int, set[str]] = {}
        self.uses_caches = settings.policy not in _CACHE_BLIND
        # prefill pacing (the proxy's PrefillPacer): every policy but round robin
        self.pacing = (
            settings.prefill_pace_tokens > 0 and settings.policy != PolicyName.ROUND_ROBIN.value
        )
        self.event_stats = {pod: PodStats() for pod in self.pods}
        self._seq = dict.fromkeys(self.pods, 0)
        # each pod's scraped load and the router's own counts, kept as the registry keeps them
        self._states = {
            pod: PodState(PodSpec(pod), arrivals=ArrivalRate(clock=clock), clock=clock)
            for pod in self.pods
        }
        self._sending: dict[str, Sending] = {}  # request id -> its count at its pod
        self._ahead: set[str] = set()  # pods with prefill work ahead (PodState.ahead_since)
        self.loads: dict[str, PodLoad] = {pod: PodLoad() for pod in self.pods}
        self.block_size = block_size
        self.hot: HotPrefixes | None = None
        if settings.replicate_after and self.uses_caches:
            self.hot = HotPrefixes(
                settings.replicate_after,
                settings.replicate_per_minute,
                settings.replicate_min_tokens,
                clock=clock,
            )
        # copies planned and not yet taken by the simulation, with their prompts' hashes
        self._copies: list[tuple[Replication, list[int]]] = []
        self.num_copies = 0
        # |predicted - measured| / measured TTFT of each request the models predicted
        self.ttft_errors: list[float] = []

    # ---- a request ------------------------------------------------------------------------

    def route(
        self, request_id: int, hashes: list[int], num_tokens: int, output_tokens: int = 0
    ) -> routing.Route:
        """The proxy's lookup, decide_route and recent-route record for one request."""
        route = self.decide(request_id, hashes, num_tokens, output_tokens)
        self.send(route, hashes, num_tokens, output_tokens)
        return route

    def paced(self, route: routing.Route) -> bool:
        """The route's prompt waits for room at its pod (prefill pacing)."""
        return self.pacing and paced(route, self.loads, self.settings.prefill_pace_tokens)

    def decide(
        self, request_id: int, hashes: list[int], num_tokens: int, output_tokens: int = 0
    ) -> routing.Route:
        """The proxy's lookup and decide_route for one request (nothing recorded: `send`)."""
        caches = self.caches(hashes) if self.uses_caches else {}
        # --kv-room: what the request holds where it goes (only a cache-aware policy reads it)
        kv_room = self.settings.kv_room and self.uses_caches
        own = count_own_blocks(len(hashes), num_tokens, output_tokens, self.block_size)
        # the registry's loads are read at each decision: the time a pod has spent on the
        # prefill work ahead moves between events (only pods with work ahead change). Only
        # the latency models read it: other policies skip this (at 256 pods, most of a run)
        if self.learns:
            for pod in self._ahead:
                self.loads[pod] = self._states[pod].current_load()
        return routing.decide_route(
            self.routing,
            str(request_id),
            len(hashes),
            num_tokens,
            self.request_class,
            self.pods,
            [],
            caches,
            self.loads,
            full=self._full(hashes, own, num_tokens, caches, kv_room),
        )

    def _full(
        self,
        hashes: list[int],
        own: int,
        num_tokens: int,
        caches: dict[str, PodCache],
        kv_room: bool,
    ) -> frozenset[str]:
        """The pods saturated for the request: without KV room for it (`kv_room`), or where
        it would wait for room (prefill pacing, the decider's `_paced`)."""
        full = pods_without_room(self.loads, self._states, hashes, own) if kv_room else frozenset()
        if self.pacing:
            pace = self.settings.prefill_pace_tokens
            full |= paced_pods(self.loads, caches, num_tokens, self.block_size, pace)
        return full

    def send(
        self, route: routing.Route, hashes: list[int], num_tokens: int, output_tokens: int = 0
    ) -> None:
        """The decided route goes: its prefix recorded as routed there, its request counted
        in flight (what the proxy does after decide_route)."""
        kv_room = self.settings.kv_room and self.uses_caches
        own = count_own_blocks(len(hashes), num_tokens, output_tokens, self.block_size)
        pod = route.decode.pod
        if self.recent is not None and hashes and self.uses_caches:
            self.recent.record(pod, hashes)
            self._routed_first.setdefault(hashes[0], set()).add(pod)
        held = (hashes, own) if kv_room else ((), 0)
        sending = Sending(self._states[pod], route.shape.uncached_tokens, *held)
        self._sending[route.request_id] = sending
        self._refresh(pod)
        if self.hot is not None and hashes:
            for copy in self.hot.observe(route, hashes, self.block_size):
                self._copies.append((copy, hashes))

    def take_copies(self) -> list[tuple[Replication, list[int]]]:
        """The hot-prefix copies planned since the last call (the simulation runs them)."""
        copies, self._copies = self._copies, []
        return copies

    def copied(self, copy: Replication, hashes: list[int]) -> None:
        """A copy's blocks are in its target (as the Replicator's success)."""
        assert self.hot is not None
        self.hot.done(copy)
        self.num_copies += 1
        if self.recent is not None:
            self.recent.record(copy.target, hashes[: copy.num_blocks])
            self._routed_first.setdefault(hashes[0], set()).add(copy.target)

    def answering(self, route: routing.Route) -> None:
        """The request's first token is out: its prefill is no longer ahead of others."""
        self._sending[route.request_id].answering()
        self._refresh(route.decode.pod)

    def caches(self, hashes: list[int]) -> dict[str, PodCache]:
        """Each pod's cached run (the proxy's `_caches`, without a shared tier)."""
        if not hashes:
            return {}
        hits = self.index.lookup_prefix(hashes)
        caches = {pod: PodCache(hit.num_blocks, hit.tiers) for pod, hit in hits.items()}
        if self.recent is not None:
            for pod in self._routed_first.get(hashes[0], ()):
                run = self.recent.run_length(pod, hashes)
                if run:
                    caches[pod] = extended(caches.get(pod) or PodCache(), run, MEDIUM_GPU)
        return caches

    def finished(self, route: routing.Route, ttft_s: float, tpot_s: float | None) -> None:
        """The request ended: in-flight down; under policy slo the latency models learn, and
        the prediction's error is kept (as the dispatcher's `learn_from_answer`). The router
        learns under every policy; here that would only cost time (a third of a 256-pod run)
        and change no other policy's decision."""
        pod = route.decode.pod
        self._sending.pop(route.request_id).ended()
        self._refresh(pod)
        if not self.learns:
            return
        error = relative_error(route.prediction, ttft_s)
        if error is not None:
            self.ttft_errors.append(error)
        self.latency.observe(pod, "direct", route.shape, ttft_s, tpot_s)

    # ---- what the pods tell it ------------------------------------------------------------

    def ingest(self, pod: str, batch: EventBatch) -> None:
        """One event batch of `pod`, through the ingestor's own apply_update."""
        if not self.uses_caches:
            return
        self._seq[pod] += 1
        update = ReceivedBatch(pod, self._seq[pod], batch)
        apply_update(self.index, pod, update, self.event_stats[pod])

    def scraped(self, pod: str, load: PodLoad) -> None:
        """A /metrics poll of `pod` read `load` (its in-flight count is the router's)."""
        self._states[pod].load = load
        self._refresh(pod)

    def _refresh(self, pod: str) -> None:
        state = self._states[pod]
        self.loads[pod] = state.current_load()
        if state.ahead_since is None:
            self._ahead.discard(pod)
        else:
            self._ahead.add(pod)
