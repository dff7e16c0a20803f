"""One simulation: N simulated pods behind the router's real code, on a SimPy clock.

A request's life: it arrives (the workload's time; for a closed-loop request,
`SimRequest.think_s` after the answer it follows ends) -> the router looks its block hashes up and
decides (`SimRouter.decide`: index, recent routes, decide_route), `RouterSettings.dispatch_s`
after it is free of the request before; a long prompt that prefill pacing holds
(`RouterSettings.prefill_pace_tokens`) is decided again at each first token and end until it
may go -> the chosen pod queues it ->
the pod's engine prefills it (first token) and decodes it (done) -> the router's in-flight
count drops and, for policy slo, its latency model learns. A hot-prefix copy the router plans
(`RouterSettings.replicate_after`) lands in its target `PodConfig.copy_s_per_block` per block
later (the transfer; the two one-token steps of the copy are not modelled). Meanwhile each pod
publishes KV events that reach the router's index `event_delay_s` later, and the router
scrapes every pod's gauges every `scrape_interval_s`.

`sweep` runs every policy at every pod count on the same requests (same seed) and returns one
`Summary` each.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import simpy

from vllm_llmd.events.model import EventBatch
from vllm_llmd.router.pacing import MAX_JUDGED
from vllm_llmd.router.replication import Replication
from vllm_llmd.router.routing import Route
from vllm_llmd.router.slo import SLO
from vllm_llmd.sim.metrics import Summary, summarize
from vllm_llmd.sim.pod import Outcome, PodConfig, Process, SimPod
from vllm_llmd.sim.profile import H100_LLAMA_8B, LatencyProfile
from vllm_llmd.sim.router import RouterSettings, SimRouter
from vllm_llmd.sim.workloads import SimRequest


@dataclass(frozen=True)
class SimConfig:
    """Everything but the workload and the policy."""

    num_pods: int
    pod: PodConfig = field(default_factory=PodConfig)
    profile: LatencyProfile = H100_LLAMA_8B
    router: RouterSettings = field(default_factory=RouterSettings)
    # the targets goodput counts against (TTFT and TPOT, seconds)
    goodput_slo: SLO = field(default_factory=lambda: SLO(ttft_s=0.5, tpot_s=0.05))


@dataclass
class RunResult:
    summary: Summary
    outcomes: list[Outcome]
    router: SimRouter
    pods: dict[str, SimPod]


def pod_ids(num_pods: int) -> list[str]:
    return [f"pod-{i:03d}" for i in range(num_pods)]


# young-generation threshold of the collector during a run (CPython's default is 700)
_RUN_GC_THRESHOLD = 100_000


@contextmanager
def _rare_collections() -> Iterator[None]:
    """Run the cyclic garbage collector rarely, then restore its thresholds.

    A run keeps a large heap alive (the workload's requests, an index of up to a million
    blocks: millions of dicts and lists) and makes few reference cycles. At CPython's default
    thresholds the collector scans that heap again and again: a tenth of a 256-pod run's time.
    Reference counting frees almost everything anyway; the collector only changes when cycles
    are freed, never what the simulation computes.
    """
    thresholds = gc.get_threshold()
    gc.set_threshold(_RUN_GC_THRESHOLD, *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)


def simulate(config: SimConfig, requests: Iterable[SimRequest]) -> RunResult:
    """Run the requests through the router and the pods until every one has ended."""
    with _rare_collections():
        return _simulate(config, requests)


def _simulate(config: SimConfig, requests: Iterable[SimRequest]) -> RunResult:
    started = time.perf_counter()
    env = simpy.Environment()
    settings = config.router
    router = SimRouter(settings, pod_ids(config.num_pods), config.pod.block_size, lambda: env.now)
    routes: dict[int, Route] = {}
    outcomes: list[Outcome] = []
    last_done = [0.0]  # when the last request ended (the scraper may tick on past it)

    def publish(pod: str, batch: EventBatch) -> None:
        arrival = env.timeout(settings.event_delay_s)
        arrival.callbacks.append(lambda _: router.ingest(pod, batch))

    # closed-loop requests by the id of the request whose answer they wait for, and their ids
    followers: dict[int, SimRequest] = {}
    following_ids: set[int] = set()

    def done(outcome: Outcome) -> None:
        route = routes.pop(outcome.request_id)
        router.finished(route, outcome.ttft_s, outcome.tpot_s or None)
        outcomes.append(outcome)
        last_done[0] = float(env.now)
        if outcome.request_id in followers:
            env.process(following(outcome.request_id))
        if held:
            release()

    def first_token(request_id: int) -> None:
        router.answering(routes[request_id])
        if held:
            release()

    pods = {
        pod: SimPod(env, pod, config.pod, config.profile, publish, done, first_token)
        for pod in router.pods
    }
    arriving = [True]
    # requests the router has not handed to a pod yet (RouterSettings.dispatch_s), and when it
    # is free to take the next
    handing: set[int] = set()
    router_free = [0.0]

    def dispatch(request: SimRequest) -> None:
        if settings.dispatch_s <= 0:
            hand_over(request)
            return
        done_at = max(float(env.now), router_free[0]) + settings.dispatch_s
        router_free[0] = done_at
        handing.add(request.request_id)
        env.process(hand_over_at(done_at, request))

    def hand_over_at(at_s: float, request: SimRequest) -> Process:
        yield env.timeout(at_s - env.now)
        handing.discard(request.request_id)
        hand_over(request)

    # requests the router's prefill pacing holds, in arrival order (RouterSettings)
    held: list[SimRequest] = []

    def decide(request: SimRequest) -> Route:
        return router.decide(
            request.request_id,
            request.prompt_hashes,
            request.num_prompt_tokens,
            request.num_output_tokens,
        )

    def hand_over(request: SimRequest) -> None:
        route = decide(request)
        if router.paced(route):
            held.append(request)
        else:
            send(request, route)

    def release() -> None:
        """Held requests that have room at their pod now go, in arrival order, of the oldest
        `MAX_JUDGED` as the router judges them (each counted at its pod before the next is
        judged)."""
        i = judged = 0
        while i < len(held) and judged < MAX_JUDGED:
            judged += 1
            route = decide(held[i])
            if router.paced(route):
                i += 1
            else:
                send(held.pop(i), route)

    def send(request: SimRequest, route: Route) -> None:
        router.send(
            route, request.prompt_hashes, request.num_prompt_tokens, request.num_output_tokens
        )
        routes[request.request_id] = route
        pods[route.decode.pod].submit(request)
        for copy, hashes in router.take_copies():
            env.process(copying(copy, hashes))

    def waiting() -> set[int]:
        """Requests the router has and no pod yet: being handed over, or held."""
        return handing | {request.request_id for request in held}

    def arrivals() -> Process:
        for request in requests:
            if request.after is not None:
                after = request.after
                if after not in routes and after not in following_ids and after not in waiting():
                    raise ValueError(
                        f"request {request.request_id} follows request {request.after}, which "
                        "is neither in flight nor waiting: a closed-loop request must come "
                        "right after the one it follows"
                    )
                if request.after in followers:
                    raise ValueError(f"request {request.after} is followed twice")
                followers[request.after] = request
                following_ids.add(request.request_id)
                continue
            wait = request.arrival_s - env.now
            if wait > 0:
                yield env.timeout(wait)
            dispatch(request)
        arriving[0] = False

    def following(after: int) -> Process:
        """A closed-loop request: sent its think time after the answer it waited for."""
        request = followers[after]
        if request.think_s > 0:
            yield env.timeout(request.think_s)
        del followers[after]  # only now: the scraper runs while any request is to come
        following_ids.discard(request.request_id)
        dispatch(dataclasses.replace(request, arrival_s=float(env.now)))

    def copying(copy: Replication, hashes: list[int]) -> Process:
        yield env.timeout(config.pod.copy_s_per_block * copy.num_blocks)
        pods[copy.target].receive(hashes[: copy.num_blocks])
        router.copied(copy, hashes)

    def scrapes() -> Process:
        while arriving[0] or routes or followers or handing or held:
            yield env.timeout(settings.scrape_interval_s)
            for pod_id, pod in pods.items():
                router.scraped(pod_id, pod.load())

    env.process(arrivals())
    env.process(scrapes())
    env.run()
    summary = summarize(
        settings.policy + (COPYING if settings.replicate_after else ""),
        outcomes,
        [pod.num_requests for pod in pods.values()],
        config.goodput_slo,
        sim_s=last_done[0],
        wall_s=time.perf_counter() - started,
        ttft_errors=router.ttft_errors,
    )
    return RunResult(summary, outcomes, router, pods)


# the suffix of a policy name that turns hot-prefix copies on (`sweep`, the CLI)
COPYING = "+copy"

# a workload for a pod count: (num_pods) -> requests (a fresh iterator, same seed each call)
Workload = Callable[[int], Iterator[SimRequest]]


@dataclass(frozen=True)
class SweepPoint:
    """One run of a sweep: its figures and every request's TTFT (for the CDF plot)."""

    summary: Summary
    ttft_s: list[float]


def sweep(
    workload: Workload,
    pod_counts: Sequence[int],
    policies: Sequence[str],
    base: SimConfig,
    on_point: Callable[[SweepPoint], None] | None = None,
) -> list[SweepPoint]:
    """Every policy at every pod count, on the same requests (each run's index and pods are
    dropped once summarized: a 256-pod index is large)."""
    points = []
    for num_pods in pod_counts:
        for name in policies:
            # NAME+copy: the policy with hot-prefix copies (base's replicate_after, else 3)
            policy = name.removesuffix(COPYING)
            copies = (base.router.replicate_after or 3) if policy != name else 0
            router = dataclasses.replace(base.router, policy=policy, replicate_after=copies)
            config = dataclasses.replace(base, num_pods=num_pods, router=router)
            result = simulate(config, workload(num_pods))
            point = SweepPoint(result.summary, [o.ttft_s for o in result.outcomes])
            del result
            if on_point is not None:
                on_point(point)
            points.append(point)
    return points
