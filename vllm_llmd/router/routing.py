"""Where one request goes: a pure decision over what the router knows when it chooses.

`decide_route` takes the candidates, their cached prefixes and loads, and the policy (or the
SLO planner), and returns a `Route`; it does no I/O and changes nothing, so it is tested
without a server. The proxy gathers its inputs and acts on its answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from vllm_llmd.router.config import Role
from vllm_llmd.router.latency import LatencyModels, Prediction, RequestShape
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
    # the request on the decode pod at dispatch (what its latency model learns from)
    shape: RequestShape
    # the decode pod's predicted latency (None: model cold)
    prediction: Prediction | None = None
    # seconds the request waited in the router's admission queue
    queued_s: float = 0.0
    # how it was admitted (see slo.Admitted)
    admission: Admitted = "met"
    # the request on the prefill pod at dispatch, for a P/D route
    prefill_shape: RequestShape | None = None
    # each pod's cached run of the prompt as scored (its own tiers, prefixes just routed
    # there, then the shared tier)
    caches: Mapping[str, PodCache] = field(default_factory=dict)


@dataclass(frozen=True)
class RoutingPolicy:
    """How the router chooses: a scoring policy, or the SLO planner over it."""

    policy: ScoringPolicy
    planner: SLOPlanner | None
    latency: LatencyModels
    block_size: int
    # prompts with more uncached tokens go prefill -> decode when prefill pods exist
    pd_threshold_tokens: int


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
) -> Route:
    """Choose the decode pod (one of decode_pods, not empty) and, for a long uncached prompt
    with prefill pods (or one chosen upstream), the prefill pod."""
    assert decode_pods, "the caller answers 503 when no decode pod is healthy"
    request = ScoreInput(num_blocks, decode_pods, caches, loads)
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
    if chosen_prefill is not None:  # chosen upstream (llm-d's gateway): honour it
        prefill = Decision(chosen_prefill, "prefill chosen upstream (header)", {}, 0)
    elif prefill_pods and num_tokens is not None and uncached > how.pd_threshold_tokens:
        prefill_request = ScoreInput(num_blocks, prefill_pods, caches, loads)
        if how.planner is not None:
            slo = request_class.slo
            prefill = how.planner.choose(prefill_request, num_tokens, slo, mode="prefill").decision
        else:
            prefill = how.policy.choose(prefill_request)
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
