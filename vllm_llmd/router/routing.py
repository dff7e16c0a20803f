"""Where one request goes: a pure decision over what the router knows when it chooses.

`decide_route` takes the candidates, their cached prefixes and loads, and the policy (or the
SLO planner), and returns a `Route`; it does no I/O and changes nothing, so it is tested
without a server. The proxy gathers its inputs and acts on its answer.

A P/D route's first step runs on a prefill pod: one of the prefill pods when P/D is predicted
to cost less than the decode pod computing alone (while the latency models are cold: when more
than `pd_threshold_tokens` of the prompt is uncached), one an upstream gateway named, or
(`pull_from_holders`) a KV source: another pod that holds more of the prompt than the chosen
decode pod (its device cache or host or disk tier). It runs the prompt computing only what it
lacks, and the decode pod pulls the prompt's KV from it over the side channel instead of
computing it: a hot prefix that one busy pod holds reaches an idle pod for the cost of a copy.
Chosen when the source holds at least `pd_threshold_tokens` more, has fewer than
`holder_max_waiting` requests waiting, and, once both latency models are warm, the pull is
predicted to cost less than computing on the decode pod.

What a way costs is the request's own mean TTFT that way (the prediction plus the mean miss
lately: a way with a long tail, such as a pull that is sometimes starved, costs its mean, not
its typical answer) plus the delay its prompt adds to the
requests that will reach each pod it runs on while that prompt is still ahead of them
(`delay_to_others`): the sum of every request's TTFT, which the mean TTFT is, not this one's
alone. Without that term a long prompt stays on the decode pod whenever P/D does not make it
faster itself, and every short prompt behind it waits out its prefill; with it, the long
prompt goes where few requests queue behind it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from vllm_llmd.router.config import Role
from vllm_llmd.router.latency import LatencyModels, Prediction, RequestShape, ServeMode
from vllm_llmd.router.load import PodLoad
from vllm_llmd.router.predictive import SLOPlanner, request_shape
from vllm_llmd.router.scoring import Decision, PodCache, ScoreInput, ScoringPolicy
from vllm_llmd.router.slo import Admitted, RequestClass

DECODE_ROLES: tuple[Role, ...] = ("both", "decode")
PREFILL_ROLES: tuple[Role, ...] = ("prefill",)


@dataclass
class Route:
    """Where one request goes, and why (also the audit record)."""

    request_id: str
    decode: Decision
    prefill: Decision | None
    num_prompt_tokens: int | None
    hit_tokens: int
    # every pod's load as the router saw it when it chose
    loads: Mapping[str, PodLoad]
    request_class: RequestClass
    # the request on the decode pod at dispatch (what its latency model learns from); a P/D
    # route's once the prefill is done, when its decode request goes (after_prefill)
    shape: RequestShape
    # the decode pod's predicted latency (None: model cold)
    prediction: Prediction | None = None
    # seconds the request waited in the router: its admission queue, and prefill pacing
    queued_s: float = 0.0
    # how it was admitted (see slo.Admitted)
    admission: Admitted = "met"
    # the request on the prefill pod at dispatch, for a P/D route
    prefill_shape: RequestShape | None = None
    # each pod's cached run of the prompt as scored (its own tiers, prefixes just routed
    # there, then the shared tier)
    caches: Mapping[str, PodCache] = field(default_factory=dict)
    # what the request holds of a pod's KV cache while in flight (`pod_state.Sending`): its
    # prompt's full blocks (hashes) and the blocks besides (partial block, answer)
    blocks: Sequence[int] = ()
    own_blocks: int = 0


@dataclass(frozen=True)
class RoutingPolicy:
    """How the router chooses: a scoring policy, or the SLO planner over it."""

    policy: ScoringPolicy
    planner: SLOPlanner | None
    latency: LatencyModels
    block_size: int
    # prompts with more uncached tokens go prefill -> decode when prefill pods exist
    pd_threshold_tokens: int
    # a pod that holds more of the prompt may be the decode pod's KV source (module docstring)
    pull_from_holders: bool = False
    # a KV source with this many requests waiting is too busy to be one (a policy avoids a
    # pod from fewer: a saturated holder's one short step may still beat a recompute)
    holder_max_waiting: int = 16
    # room is counted for each request (--kv-room): `full` replaces the KV-usage threshold
    # where it can (scoring.kv_gauge_full)
    kv_room: bool = False


def decide_route(
    how: RoutingPolicy,
    request_id: str,
    num_blocks: int,
    num_tokens: int | None,
    request_class: RequestClass,
    decode_pods: list[str],
    prefill_pods: list[str],
    caches: Mapping[str, PodCache],
    loads: Mapping[str, PodLoad],
    chosen_prefill: str | None = None,
    holder_pods: Sequence[str] = (),
    full: frozenset[str] = frozenset(),
) -> Route:
    """Choose the decode pod (one of decode_pods, not empty) and, for a long uncached prompt
    with prefill pods (or one chosen upstream), the prefill pod; else, with
    `how.pull_from_holders`, perhaps one of holder_pods as its KV source. `full`: the pods
    with no room in their KV cache for the request now (ScoreInput.full)."""
    assert decode_pods, "the caller answers 503 when no decode pod is healthy"
    request = ScoreInput(num_blocks, decode_pods, caches, loads, full, how.kv_room)
    prediction = None
    if how.planner is not None:
        choice = how.planner.choose(request, num_tokens, request_class.slo)
        decode, prediction = choice.decision, choice.prediction
    else:
        decode = how.policy.choose(request)
    shape = request_shape(request, decode.pod, num_tokens or 0, how.block_size)
    if prediction is None:  # learn and report for every policy
        prediction = how.latency.predict(decode.pod, "direct", shape)
    prefill = None
    hit_tokens = decode.hit_blocks * how.block_size
    uncached = (num_tokens or 0) - hit_tokens
    if chosen_prefill == decode.pod:  # a KV source named upstream that serves it anyway
        pass
    elif chosen_prefill is not None:  # chosen upstream (llm-d's gateway): honour it
        prefill = Decision(chosen_prefill, "prefill chosen upstream (header)", {}, 0)
    elif prefill_pods and num_tokens is not None and uncached > 0:
        prefill_request = ScoreInput(num_blocks, prefill_pods, caches, loads, full, how.kv_room)
        if how.planner is not None:
            slo = request_class.slo
            prefill = how.planner.choose(prefill_request, num_tokens, slo, mode="prefill").decision
        else:
            prefill = how.policy.choose(prefill_request)
        prefill = worth_a_remote_prefill(
            how, prefill, decode, shape, prefill_request, num_tokens, uncached
        )
    if prefill is None and chosen_prefill is None and how.pull_from_holders and num_tokens:
        prefill = kv_source(how, decode, shape, holder_pods, caches, loads, num_tokens)
    prefill_shape = None
    if prefill is not None and prefill.pod in loads:
        prefill_shape = request_shape(
            ScoreInput(num_blocks, [prefill.pod], caches, loads),
            prefill.pod,
            num_tokens or 0,
            how.block_size,
        )
    return Route(
        request_id,
        decode,
        prefill,
        num_tokens,
        hit_tokens,
        loads,
        request_class,
        shape,
        prediction if prediction.ttft_s is not None else None,
        prefill_shape=prefill_shape,
        caches=caches,
    )


def worth_a_remote_prefill(
    how: RoutingPolicy,
    prefill: Decision,
    decode: Decision,
    decode_shape: RequestShape,
    prefill_request: ScoreInput,
    num_tokens: int,
    uncached: int,
) -> Decision | None:
    """The prefill pod's step, if P/D is worth it for this request (else None: the decode pod
    computes the prompt itself). Once the latency models are warm, by predicted cost: the
    prefill pod's step (its queue and the prompt it lacks) plus the decode pod's TTFT after the
    transfer, against the decode pod computing alone. While they are cold, or have not seen
    a prompt this long both ways (P/D and alone: one way is then an extrapolation, and the way
    the threshold never takes would never be learnt), by the fixed `pd_threshold_tokens` of
    uncached prompt tokens."""
    prefill_shape = request_shape(prefill_request, prefill.pod, num_tokens, how.block_size)
    known = all(how.latency.has_seen(mode, uncached) for mode in ("prefill", "direct"))
    costs = pd_costs(how, prefill.pod, prefill_shape, decode.pod, decode_shape)
    if costs is None or not known:
        return prefill if uncached > how.pd_threshold_tokens else None
    remote, alone = costs
    if remote >= alone:
        return None
    reason = f"{prefill.reason}; P/D predicted to cost {remote:.3f} s against {alone:.3f} s alone"
    return Decision(prefill.pod, reason, prefill.scores, prefill.hit_blocks)


def pd_costs(
    how: RoutingPolicy,
    source: str,
    source_shape: RequestShape,
    decode: str,
    decode_shape: RequestShape,
) -> tuple[float, float] | None:
    """(P/D, alone): what the request costs served by `source`'s prefill step then `decode`
    after the transfer, and by `decode` alone: its mean TTFT each way (the prediction plus
    the mean miss lately: `LatencyModels.mean_ttft_s`) plus what it delays of the requests
    behind it on each pod it runs on (module docstring). None while a model is cold."""
    latency = how.latency
    prefill_ttft = latency.mean_ttft_s(source, "prefill", source_shape)
    direct_ttft = latency.mean_ttft_s(decode, "direct", decode_shape)
    if prefill_ttft is None or direct_ttft is None:
        return None
    # the decode request reaches its pod once the prefill is done (as it learns: Dispatcher.
    # run_prefill): a short prompt's 30 ms prefill leaves it behind most of a long prompt
    # ahead there, a long one's finds that prompt done
    transferred = decode_shape.after_prefill(prefill_ttft)
    decode_ttft = latency.mean_ttft_s(decode, "decode", transferred)
    if decode_ttft is None:
        return None
    remote = (
        prefill_ttft
        + decode_ttft
        + delay_to_others(how, source, "prefill", source_shape, prefill_ttft)
        + delay_to_others(how, decode, "decode", transferred, decode_ttft)
    )
    alone = direct_ttft + delay_to_others(how, decode, "direct", decode_shape, direct_ttft)
    return remote, alone


def delay_to_others(
    how: RoutingPolicy, pod: str, mode: ServeMode, shape: RequestShape, ttft_s: float
) -> float:
    """Seconds of TTFT the request's prompt adds, summed over the requests that will reach
    `pod` while it is ahead of them: at the pod's arrival rate r, those that come while it
    waits (ttft - work) are held back its whole `work`, those that come during its own prefill
    half of it on average, so r * work * (wait + work / 2). The first-order cost: the knock-on
    on requests behind those is left out, so a loaded pod's is an underestimate."""
    work = how.latency.prompt_work_s(pod, mode, shape)
    rate = shape.arrival_rate
    if work is None or rate <= 0:
        return 0.0
    wait = max(0.0, ttft_s - work)
    return rate * work * (wait + work / 2)


def kv_source(
    how: RoutingPolicy,
    decode: Decision,
    decode_shape: RequestShape,
    holder_pods: Sequence[str],
    caches: Mapping[str, PodCache],
    loads: Mapping[str, PodLoad],
    num_tokens: int,
) -> Decision | None:
    """The pod the decode pod should pull the prompt's KV from, or None (module docstring):
    the holder of the longest cached run that beats the decode pod's by `pd_threshold_tokens`
    and is not saturated; when the latency models can tell, only if the source's prefill and
    the decode after the pull are predicted faster than the decode pod alone."""
    own_blocks = decode.hit_blocks
    best: tuple[int, str] | None = None
    for pod in holder_pods:
        cache = caches.get(pod)
        if pod == decode.pod or cache is None:
            continue
        gain_tokens = min(num_tokens, cache.num_blocks * how.block_size) - min(
            num_tokens, own_blocks * how.block_size
        )
        load = loads.get(pod)
        if gain_tokens <= how.pd_threshold_tokens:
            continue
        if load is not None and load.num_waiting >= how.holder_max_waiting:
            continue
        if best is None or cache.num_blocks > best[0]:
            best = (cache.num_blocks, pod)
    if best is None:
        return None
    blocks, pod = best
    candidates = [decode.pod, pod]
    request = ScoreInput(blocks, candidates, caches, loads)
    source_shape = request_shape(request, pod, num_tokens, how.block_size)
    # the decode model learns P/D decodes by the decode pod's own view (Route.shape)
    costs = pd_costs(how, pod, source_shape, decode.pod, decode_shape)
    reason = f"KV source: holds {blocks - own_blocks} more blocks of the prompt than {decode.pod}"
    if costs is not None:
        remote, alone = costs
        if remote >= alone:
            return None  # computing on the decode pod is predicted to cost less
        reason += f" (predicted to cost {remote:.3f} s against {alone:.3f} s)"
    return Decision(pod, reason, {}, blocks)
