"""Service-level objectives of a request, its priority class, and the router's admission queue.

A request's SLOs come from llm-d's headers, so clients need no change: `x-llm-d-slo-ttft-ms`
(time to first token) and `x-llm-d-slo-tpot-ms` (time per output token), else the model's
defaults, else the router's. Its priority comes from the objective it names
(`x-llm-d-inference-objective`, mapped to an integer priority by the router's config; unknown or
absent: priority 0) and its fairness id from `x-llm-d-inference-fairness-id` (absent:
"default"). llm-d's earlier names (`x-slo-ttft-ms`, `x-slo-tpot-ms`,
`x-gateway-inference-objective`, `x-gateway-inference-fairness-id`) are read too, where the
current one is absent. As in the Gateway API
Inference Extension, a negative priority is *sheddable*: when no pod can serve it within its
SLO, it is refused with 429 and `Retry-After` instead of waiting. A request with a TTFT SLO
and no objective waits for a pod that can still meet what is left of its SLO and is refused
(429) if its deadline passes first, or as soon as no pod, however idle, could meet what is left
of it (on arrival: unless its pod is next to idle, where it is served best effort); one that
named an objective of priority >= 0 (critical) is dispatched late then instead, never dropped
(`RequestClass.served_late`).

`AdmissionQueue` holds the requests that may not be dispatched yet (the pool is saturated, or
no pod is predicted to meet the SLO). Its order: higher priority first; within a priority, the
fairness ids with queued requests take turns (one request each), so one id flooding the router
cannot starve another; within an id, the earliest deadline (arrival + TTFT SLO) first. A request
waits until the router admits it, finds its SLO out of reach, or its deadline passes, never
longer.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

# llm-d's current header names, and the earlier ones it keeps as aliases (read when the
# current one is absent)
TTFT_HEADER = "x-llm-d-slo-ttft-ms"
TPOT_HEADER = "x-llm-d-slo-tpot-ms"
OBJECTIVE_HEADER = "x-llm-d-inference-objective"
FAIRNESS_HEADER = "x-llm-d-inference-fairness-id"
HEADER_ALIASES: dict[str, str] = {
    TTFT_HEADER: "x-slo-ttft-ms",
    TPOT_HEADER: "x-slo-tpot-ms",
    OBJECTIVE_HEADER: "x-gateway-inference-objective",
    FAIRNESS_HEADER: "x-gateway-inference-fairness-id",
}
DEFAULT_FAIRNESS_ID = "default"

# How a request was let through: "met" at once; "queued" after waiting for a pod with room;
# "late" when its deadline passed without one (dispatched anyway).
Admitted = Literal["met", "queued", "late"]
# ... or refused: "shed" (429 at once: sheddable with no pod in time, or its SLO out of reach
# on a busy pool), "expired" (its TTFT SLO passed in the queue, or went out of reach there,
# 429) or "rejected" (the queue is full, 503).
AdmissionOutcome = Literal[Admitted, "shed", "expired", "rejected"]
# The router's judgement of a request at one moment: dispatch it now, let it wait for a pod,
# or refuse it now (waiting cannot bring its SLO within reach).
Verdict = Literal["admit", "wait", "refuse"]


class SLOHeaderError(ValueError):
    """A request header carrying an SLO or class is malformed."""


@dataclass(frozen=True, slots=True)
class SLO:
    """Latency targets in seconds; None: no target."""

    ttft_s: float | None = None
    tpot_s: float | None = None

    @property
    def is_set(self) -> bool:
        """At least one target."""
        return self.ttft_s is not None or self.tpot_s is not None

    @classmethod
    def parse(cls, text: str) -> SLO:
        """`ttft=MS,tpot=MS` (either part optional) -> SLO; ValueError names the fault."""
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key not in ("ttft", "tpot"):
                raise ValueError(f"SLO {text!r}: expected ttft=MS and/or tpot=MS, got {part!r}")
            values[key] = _positive_ms(value, f"SLO {text!r}")
        return cls(values.get("ttft"), values.get("tpot"))


@dataclass(frozen=True, slots=True)
class RequestClass:
    """How the router treats a request when the pool cannot serve everything at once."""

    slo: SLO
    priority: int = 0
    fairness_id: str = DEFAULT_FAIRNESS_ID
    objective: str | None = None

    @property
    def plain(self) -> bool:
        """No SLO, no objective, no fairness id: nothing for admission to weigh or share out,
        so never held back."""
        return (
            not self.slo.is_set
            and self.objective is None
            and self.fairness_id == DEFAULT_FAIRNESS_ID
        )

    @property
    def sheddable(self) -> bool:
        """Refused at once (429) when no pod can serve it in time: a negative priority."""
        return self.priority < 0

    @property
    def served_late(self) -> bool:
        """Dispatched when its deadline passes in the queue, late rather than never: a request
        that named an objective of priority >= 0 (critical traffic), or one without a TTFT SLO.
        The rest, a TTFT SLO and no objective, are refused then (429): a first token after
        the SLO is worth nothing to its client, and serving it makes the requests behind it
        late too, which is how goodput collapses past saturation."""
        if self.sheddable:
            return False
        return self.objective is not None or self.slo.ttft_s is None

    def within(self, waited_s: float) -> RequestClass:
        """This class after `waited_s` in the queue: its TTFT SLO is what is left of it."""
        if self.slo.ttft_s is None or waited_s <= 0:
            return self
        left = SLO(max(self.slo.ttft_s - waited_s, 1e-6), self.slo.tpot_s)
        return RequestClass(left, self.priority, self.fairness_id, self.objective)


@dataclass(frozen=True)
class SLOConfig:
    """Defaults and knobs of SLO-aware routing (flags `--slo*`, `--objective`, `--queue-*`)."""

    default_slo: SLO = SLO()
    # model name -> its SLO (a part it leaves out falls back to default_slo)
    model_slos: Mapping[str, SLO] = field(default_factory=dict)
    # objective name -> priority (negative: sheddable)
    objectives: Mapping[str, int] = field(default_factory=dict)
    # a pod meets an SLO when its prediction is within (1 - headroom) of it
    headroom: float = 0.1
    # requests the router may hold; more are refused (429 sheddable, 503 others)
    max_queue: int = 1024
    # how long a request without a TTFT SLO may wait in the queue
    queue_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 <= self.headroom < 1:
            raise ValueError(f"SLO headroom must be in [0, 1), got {self.headroom}")
        if self.max_queue < 0 or self.queue_timeout_s <= 0:
            raise ValueError("need max_queue >= 0 and queue_timeout_s > 0")

    def classify(self, headers: Mapping[str, str], model: str | None) -> RequestClass:
        """The request's SLO, priority and fairness id; SLOHeaderError on a bad header."""
        base = self.model_slos.get(model or "", SLO())
        ttft = _header_ms(headers, TTFT_HEADER)
        tpot = _header_ms(headers, TPOT_HEADER)
        slo = SLO(
            ttft if ttft is not None else base.ttft_s or self.default_slo.ttft_s,
            tpot if tpot is not None else base.tpot_s or self.default_slo.tpot_s,
        )
        objective = _header(headers, OBJECTIVE_HEADER)[1] or None
        priority = self.objectives.get(objective, 0) if objective else 0
        fairness_id = _header(headers, FAIRNESS_HEADER)[1] or DEFAULT_FAIRNESS_ID
        return RequestClass(slo, priority, fairness_id, objective)


def _header(headers: Mapping[str, str], name: str) -> tuple[str, str | None]:
    """(the name it came under, its value): llm-d's current name, else its earlier one."""
    value = headers.get(name)
    if value is None and name in HEADER_ALIASES:
        alias = HEADER_ALIASES[name]
        return alias, headers.get(alias)
    return name, value


def _header_ms(headers: Mapping[str, str], name: str) -> float | None:
    found, value = _header(headers, name)
    return None if value is None else _positive_ms(value, f"header {found}")


def _positive_ms(value: str, what: str) -> float:
    try:
        ms = float(value)
    except ValueError:
        raise SLOHeaderError(f"{what}: {value!r} is not a number of milliseconds") from None
    seconds = ms / 1000.0  # a subnormal ms > 0 is 0 s: refused too
    if not seconds > 0 or ms == float("inf"):
        raise SLOHeaderError(f"{what}: milliseconds must be > 0 and finite, got {value!r}")
    return seconds


def parse_objective(text: str) -> tuple[str, int]:
    """`NAME=PRIORITY` -> (name, priority); ValueError names the fault."""
    name, sep, value = text.partition("=")
    try:
        priority = int(value)
    except ValueError:
        priority = None
    if not sep or not name.strip() or priority is None:
        raise ValueError(f"objective {text!r}: expected NAME=PRIORITY (an integer)")
    return name.strip(), priority


def parse_model_slo(text: str) -> tuple[str, SLO]:
    """`MODEL:ttft=MS,tpot=MS` -> (model, SLO)."""
    model, sep, slo = text.rpartition(":")
    if not sep or not model:
        raise ValueError(f"model SLO {text!r}: expected MODEL:ttft=MS,tpot=MS")
    return model, SLO.parse(slo)


# ---- the queue ----------------------------------------------------------------------------


class QueueFullError(RuntimeError):
    """The admission queue holds max_queue requests already."""


@dataclass(eq=False)
class QueuedRequest:
    """One request waiting for admission."""

    request_class: RequestClass
    arrival: float
    deadline: float
    # the router's judgement of this request, queued this many seconds
    judge: Callable[[float], Verdict]
    # set True when admitted, False when its deadline passed first
    admitted: asyncio.Future[bool]
    seq: int = 0


class AdmissionQueue:
    """Priority, then fair turns between fairness ids, then earliest deadline (module doc)."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        # priority -> fairness id -> heap of (deadline, seq, request)
        self._queues: dict[int, dict[str, list[tuple[float, int, QueuedRequest]]]] = {}
        # priority -> fairness ids with queued requests, in turn order
        self._turns: dict[int, deque[str]] = {}
        self._seq = itertools.count()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, request: QueuedRequest) -> None:
        if self._size >= self.max_size:
            raise QueueFullError(f"the router's queue is full ({self.max_size} requests)")
        request.seq = next(self._seq)
        cls = request.request_class
        by_id = self._queues.setdefault(cls.priority, {})
        if cls.fairness_id not in by_id:
            by_id[cls.fairness_id] = []
            self._turns.setdefault(cls.priority, deque()).append(cls.fairness_id)
        heapq.heappush(by_id[cls.fairness_id], (request.deadline, request.seq, request))
        self._size += 1

    def peek(self) -> QueuedRequest | None:
        """The request that goes next."""
        if not self._size:
            return None
        priority = max(self._queues)
        fairness_id = self._turns[priority][0]
        return self._queues[priority][fairness_id][0][2]

    def pop(self) -> QueuedRequest:
        """Take the next request; its fairness id moves to the back of its priority's turns."""
        request = self.peek()
        if request is None:
            raise IndexError("pop from an empty admission queue")
        cls = request.request_class
        heapq.heappop(self._queues[cls.priority][cls.fairness_id])
        turns = self._turns[cls.priority]
        turns.rotate(-1)
        self._forget_if_empty(cls.priority, cls.fairness_id)
        self._size -= 1
        return request

    def remove(self, request: QueuedRequest) -> bool:
        """Take a request out wherever it is (it expired, or its client left)."""
        cls = request.request_class
        heap = self._queues.get(cls.priority, {}).get(cls.fairness_id)
        if heap is None:
            return False
        for i, (_, _, queued) in enumerate(heap):
            if queued is request:
                heap[i] = heap[-1]
                heap.pop()
                heapq.heapify(heap)
                self._forget_if_empty(cls.priority, cls.fairness_id)
                self._size -= 1
                return True
        return False

    def expired(self, now: float) -> list[QueuedRequest]:
        """Queued requests whose deadline has passed."""
        return [
            request
            for by_id in self._queues.values()
            for heap in by_id.values()
            for deadline, _, request in heap
            if deadline <= now
        ]

    def _forget_if_empty(self, priority: int, fairness_id: str) -> None:
        by_id = self._queues[priority]
        if by_id[fairness_id]:
            return
        del by_id[fairness_id]
        self._turns[priority].remove(fairness_id)
        if not by_id:
            del self._queues[priority]
            del self._turns[priority]
