"""SLO-aware routing, the pure parts: request classes from headers, the admission queue's order
(priority, fair turns, deadline), the online latency model and the predictive choice."""

from __future__ import annotations

import asyncio
import random
import time

import numpy as np
import pytest

from vllm_llmd.router.admission import Admission
from vllm_llmd.router.config import PodSpec
from vllm_llmd.router.config_parse import parse_config
from vllm_llmd.router.decision import Decider
from vllm_llmd.router.index import InMemoryIndex
from vllm_llmd.router.latency import TTFT_FEATURES, LatencyModels, RequestShape
from vllm_llmd.router.load import ArrivalRate, PodLoad
from vllm_llmd.router.metrics import RouterMetrics
from vllm_llmd.router.pod_state import PodState, Sending
from vllm_llmd.router.pods import PodRegistry
from vllm_llmd.router.predictive import SLOPlanner, estimated_waiting, is_saturated, request_shape
from vllm_llmd.router.ridge import DRIFT_LIMIT, ForgettingRidge
from vllm_llmd.router.scoring import PodCache, ScoreInput, ScoringConfig, make_policy
from vllm_llmd.router.slo import (
    SLO,
    AdmissionQueue,
    QueuedRequest,
    QueueFullError,
    RequestClass,
    SLOConfig,
    SLOHeaderError,
    Verdict,
    parse_model_slo,
    parse_objective,
)

# ---- request classes ------------------------------------------------------------------------


def test_headers_win_over_model_and_router_defaults():
    config = SLOConfig(
        default_slo=SLO(1.0, 0.1),
        model_slos={"m": SLO(ttft_s=0.5)},
        objectives={"critical": 10, "batch": -1},
    )
    cls = config.classify({}, "other")
    assert cls == RequestClass(SLO(1.0, 0.1), 0, "default", None)
    assert config.classify({}, "m").slo == SLO(0.5, 0.1)  # the model's, then the router's
    cls = config.classify(
        {
            "x-slo-ttft-ms": "250",
            "x-slo-tpot-ms": "20",
            "x-gateway-inference-objective": "batch",
            "x-gateway-inference-fairness-id": "tenant-a",
        },
        "m",
    )
    assert cls.slo == SLO(0.25, 0.02)
    assert (cls.priority, cls.sheddable, cls.fairness_id) == (-1, True, "tenant-a")
    assert config.classify({"x-gateway-inference-objective": "unknown"}, "m").priority == 0


def test_llm_d_current_header_names_win_over_the_earlier_ones():
    config = SLOConfig(objectives={"batch": -1, "premium": 5})
    current = {
        "x-llm-d-slo-ttft-ms": "300",
        "x-llm-d-slo-tpot-ms": "30",
        "x-llm-d-inference-objective": "premium",
        "x-llm-d-inference-fairness-id": "tenant-b",
    }
    earlier = {
        "x-slo-ttft-ms": "250",
        "x-slo-tpot-ms": "20",
        "x-gateway-inference-objective": "batch",
        "x-gateway-inference-fairness-id": "tenant-a",
    }
    both = config.classify({**earlier, **current}, "m")
    assert (both.slo.ttft_s, both.slo.tpot_s) == (0.3, 0.03)
    assert (both.priority, both.fairness_id) == (5, "tenant-b")
    only_earlier = config.classify(earlier, "m")
    assert (only_earlier.priority, only_earlier.fairness_id) == (-1, "tenant-a")
    with pytest.raises(SLOHeaderError, match="x-llm-d-slo-tpot-ms"):
        config.classify({"x-llm-d-slo-tpot-ms": "fast"}, "m")


@pytest.mark.parametrize("value", ["abc", "0", "-5", "inf", "nan"])
def test_bad_slo_header_is_named(value):
    with pytest.raises(SLOHeaderError, match=f"x-slo-ttft-ms.*{value}"):
        SLOConfig().classify({"x-slo-ttft-ms": value}, "m")


def test_flags_parse_and_bad_ones_are_named(capsys):
    config = parse_config(
        [
            "--pod",
            "http://p:1",
            "--policy",
            "slo",
            "--objective",
            "critical=5",
            "--objective",
            "batch=-1",
            "--model-slo",
            "org/model:7b:ttft=300,tpot=40",
            "--slo-ttft-ms",
            "1000",
            "--max-waiting",
            "2",
        ]
    )
    slo = config.slo_config()
    assert slo.objectives == {"critical": 5, "batch": -1}
    assert slo.model_slos == {"org/model:7b": SLO(0.3, 0.04)}
    assert slo.default_slo == SLO(1.0, None)
    assert config.scoring_config().max_waiting == 2
    for bad, message in [
        (["--objective", "critical"], "NAME=PRIORITY"),
        (["--model-slo", "m:ttft=abc"], "not a number"),
        (["--model-slo", "m:latency=3"], "ttft=MS"),
        (["--slo-headroom", "1.5"], "headroom"),
    ]:
        with pytest.raises(SystemExit):
            parse_config(["--pod", "http://p:1", *bad])
        assert message in capsys.readouterr().err
    assert parse_objective("a=-3") == ("a", -3)
    assert parse_model_slo("m:tpot=10") == ("m", SLO(None, 0.01))


# ---- the admission queue --------------------------------------------------------------------


def _entry(priority: int, fairness_id: str, deadline: float) -> QueuedRequest:
    loop = asyncio.new_event_loop()
    try:
        future = loop.create_future()
    finally:
        loop.close()
    cls = RequestClass(SLO(), priority, fairness_id)
    return QueuedRequest(cls, 0.0, deadline, lambda waited_s: True, future)


def _drain(queue: AdmissionQueue) -> list[QueuedRequest]:
    out = []
    while len(queue):
        out.append(queue.pop())
    return out


def test_higher_priority_goes_first_then_fair_turns_then_deadline():
    queue = AdmissionQueue(100)
    flood = [_entry(0, "a", deadline=10 + i) for i in range(6)]
    for entry in flood:
        queue.push(entry)
    late_b = _entry(0, "b", deadline=50)
    early_b = _entry(0, "b", deadline=5)
    queue.push(late_b)
    queue.push(early_b)
    urgent = _entry(5, "c", deadline=100)
    queue.push(urgent)
    order = _drain(queue)
    assert order[0] is urgent
    # a and b alternate while both have requests; within b the earlier deadline goes first
    assert [e.request_class.fairness_id for e in order[1:5]] == ["a", "b", "a", "b"]
    assert order[2] is early_b and order[4] is late_b
    assert order[1:] == [flood[0], early_b, flood[1], late_b, *flood[2:]]


def test_queue_is_bounded_and_removal_and_expiry_work():
    queue = AdmissionQueue(3)
    entries = [_entry(0, "a", 1.0), _entry(0, "b", 2.0), _entry(1, "a", 3.0)]
    for entry in entries:
        queue.push(entry)
    with pytest.raises(QueueFullError, match="full"):
        queue.push(_entry(0, "a", 4.0))
    assert {id(e) for e in queue.expired(2.0)} == {id(entries[0]), id(entries[1])}
    assert queue.remove(entries[1]) and not queue.remove(entries[1])
    assert len(queue) == 2
    assert _drain(queue) == [entries[2], entries[0]]
    assert queue.peek() is None
    with pytest.raises(IndexError):
        queue.pop()


def test_fair_share_under_a_random_flood():
    """One id with 10x the requests of another still gets only every other turn."""
    rng = random.Random(7)
    queue = AdmissionQueue(1000)
    for i in range(300):
        queue.push(_entry(0, "flood" if rng.random() < 10 / 11 else "quiet", float(i)))
    served = [e.request_class.fairness_id for e in _drain(queue)]
    quiet_total = served.count("quiet")
    head = served[: 2 * quiet_total]
    assert head.count("quiet") == quiet_total  # every quiet request served in the first 2n


def _admit(cls: RequestClass, judge) -> tuple[str, float] | int:
    """(admission, seconds queued), or the refusal's HTTP status."""
    from aiohttp import web

    admission = Admission(10, queue_timeout_s=0.3, retry_after_s=1, metrics=RouterMetrics())

    async def run() -> tuple[str, float] | int:
        try:
            return await admission.admit(cls, judge)
        except web.HTTPException as exc:
            return exc.status
        finally:
            admission.stop()

    return asyncio.run(run())


def test_a_request_with_a_ttft_slo_and_no_objective_is_refused_when_its_deadline_passes():
    """Past saturation, serving it late would make the requests behind it late too."""
    never = SLO(ttft_s=0.2)
    assert _admit(RequestClass(never), lambda waited_s: "wait") == 429
    # critical traffic (an objective of priority >= 0) is served late instead, never dropped
    admission, queued_s = _admit(RequestClass(never, 0, objective="critical"), lambda w: "wait")
    assert admission == "late" and queued_s >= 0.2
    # ... and so is a request without a TTFT SLO, after --queue-timeout-s
    admission, queued_s = _admit(RequestClass(SLO()), lambda waited_s: "wait")
    assert admission == "late" and 0.3 <= queued_s < 2


def test_a_queued_request_is_judged_on_what_is_left_of_its_slo():
    asked: list[float] = []

    def judge(waited_s: float) -> Verdict:
        asked.append(waited_s)
        return "admit" if waited_s >= 0.1 else "wait"  # a pod frees up after 0.1 s

    admission, queued_s = _admit(RequestClass(SLO(ttft_s=5.0)), judge)
    assert admission == "queued" and queued_s >= 0.1
    assert asked[0] == 0.0 and asked[-1] >= 0.1 and asked == sorted(asked)
    cls = RequestClass(SLO(0.5, 0.05), 3, "tenant", "premium")
    left = cls.within(0.2)
    assert left.slo.ttft_s == pytest.approx(0.3) and left.slo.tpot_s == 0.05
    assert (left.priority, left.fairness_id, left.objective) == (3, "tenant", "premium")
    assert cls.within(0.9).slo.ttft_s > 0  # past its deadline: nothing left, still a target
    assert RequestClass(SLO()).within(5.0) == RequestClass(SLO())


# ---- the latency model ----------------------------------------------------------------------


def test_the_fit_recovers_a_linear_law():
    rng = np.random.default_rng(0)
    true = np.array([0.02, 0.15, 0.01, 0.03, 0.004])
    fit = ForgettingRidge(5, forget=1.0, strength=1e-3)
    for _ in range(200):
        x = np.array([1.0, *rng.uniform(0, 4, 1), *rng.uniform(0, 2, 1), *rng.integers(0, 5, 2)])
        fit.update(x, float(true @ x + rng.normal(0, 0.002)))
    assert np.allclose(fit.weights, true, atol=0.01), fit.weights


def test_one_prompt_length_leaves_the_split_at_the_prior_and_no_cost_negative():
    """Every prompt 2000 tokens long, hits varying: uncached + cached is constant, so the data
    cannot tell a per-token compute cost from a per-token cached cost (recursive least squares
    wandered there, once to -0.36 s per 1k uncached tokens). The fit predicts what it saw, and
    the costs stay >= 0 however long it runs."""
    rng = np.random.default_rng(1)
    fit = ForgettingRidge(len(TTFT_FEATURES), forget=0.98)
    for _ in range(2000):
        uncached = int(rng.integers(0, 2001))
        ahead = 500 * int(rng.integers(0, 3))
        shape = RequestShape(uncached, 2000 - uncached, ahead, 0)
        ttft = 0.02 + 0.3 * (uncached + ahead) / 1000 + rng.normal(0, 0.003)
        fit.update(shape.ttft_features(), float(ttft))
        assert (fit.weights[1:] >= 0).all(), fit.weights
    for uncached in (0, 1000, 2000):
        shape = RequestShape(uncached, 2000 - uncached, 500, 0)
        expected = 0.02 + 0.3 * uncached / 1000 + 0.15
        assert fit.predict(shape.ttft_features()) == pytest.approx(expected, abs=0.02)


def test_a_prompts_own_work_is_the_fits_per_token_terms_not_the_queue_or_batch():
    """The tokens ahead cost what the prompt's own uncached ones do (one fitted cost); its own
    work leaves them and the batch out."""
    models = LatencyModels(min_samples=4, forget=1.0)
    rng = np.random.default_rng(2)
    for _ in range(200):
        shape = RequestShape(*(int(v) for v in rng.integers(0, 2000, 3)), int(rng.integers(0, 8)))
        ttft = 0.01 + 0.3 * shape.uncached_tokens / 1000 + 0.05 * shape.cached_tokens / 1000
        ttft += 0.3 * shape.ahead_tokens / 1000 + 0.004 * shape.active
        models.observe("p", "direct", shape, ttft, None)
    busy = RequestShape(1000, 2000, ahead_tokens=3000, active=6)
    assert models.prompt_work_s("p", "direct", busy) == pytest.approx(0.3 + 0.1, rel=0.05)
    assert models.prompt_work_s("p", "prefill", busy) is None  # a cold mode


def test_arrival_rate_reads_a_steady_rate_and_fades_when_sends_stop():
    now = [0.0]
    rate = ArrivalRate(window_s=5.0, clock=lambda: now[0])
    assert rate.per_second() == 0.0
    for _ in range(200):  # 2 per second for 100 s
        now[0] += 0.5
        rate.add()
    assert rate.per_second() == pytest.approx(2.0, rel=0.1)
    now[0] += 20.0  # four windows without a send
    assert rate.per_second() < 0.05
    with pytest.raises(ValueError, match="window_s"):
        ArrivalRate(window_s=0)
    with pytest.raises(ValueError, match="arrival_rate"):
        PodLoad(arrival_rate=float("nan"))


def test_a_new_pod_predicts_from_the_clusters_fit_then_from_its_own():
    models = LatencyModels(min_samples=4)
    shape = RequestShape(1000, 0, 0, 1)
    for _ in range(10):
        models.observe("a", "direct", shape, 0.3, 0.02)
    # "b" never answered: the cluster's fit (all "a" so far) is its prior
    warm = models.predict("b", "direct", shape)
    assert warm.ttft_s == pytest.approx(0.3, rel=0.05)
    assert warm.tpot_s == pytest.approx(0.02, rel=0.05)
    # "b" is twice as fast: its own observations move it away from the cluster
    for _ in range(40):
        models.observe("b", "direct", shape, 0.15, 0.01)
    assert models.predict("b", "direct", shape).ttft_s == pytest.approx(0.15, rel=0.1)
    assert models.predict("a", "direct", shape).ttft_s == pytest.approx(0.3, rel=0.1)


def test_forgetting_follows_a_pod_that_got_slower():
    models = LatencyModels(min_samples=4, forget=0.9)
    shape = RequestShape(1000, 0, 0, 1)
    for _ in range(30):
        models.observe("p", "direct", shape, 0.1, 0.01)
    assert models.predict("p", "direct", shape).ttft_s == pytest.approx(0.1, rel=0.05)
    for _ in range(60):
        models.observe("p", "direct", shape, 0.4, 0.01)
    assert models.predict("p", "direct", shape).ttft_s == pytest.approx(0.4, rel=0.05)


def test_cold_model_predicts_nothing_and_modes_are_separate():
    models = LatencyModels(min_samples=3)
    shape = RequestShape(500, 0, 0, 0)
    for _ in range(2):
        models.observe("p", "prefill", shape, 0.2, None)
    assert models.predict("p", "prefill", shape).ttft_s is None  # the cluster saw 2 of 3
    models.observe("p", "prefill", shape, 0.2, None)
    assert models.predict("p", "prefill", shape).ttft_s == pytest.approx(0.2, rel=0.05)
    assert models.predict("p", "prefill", shape).tpot_s is None  # no streamed answer seen
    assert models.predict("p", "direct", shape).ttft_s is None
    with pytest.raises(ValueError, match="serve mode"):
        models.model("p", "sideways")
    models.forget_pod("p")
    assert models.samples() == {}


# ---- predictive choice ----------------------------------------------------------------------


def _warm(models: LatencyModels, pod: str, per_ktoken: float, base: float = 0.01) -> None:
    """Teach `pod` TTFT = base + per_ktoken * (uncached + queued ahead) ktokens."""
    rng = random.Random(pod)
    for _ in range(40):
        ahead = 500 * rng.randrange(3)
        shape = RequestShape(rng.randrange(0, 4000), rng.randrange(0, 2000), ahead, 0)
        ttft = base + per_ktoken * (shape.uncached_tokens + ahead) / 1000
        models.observe(pod, "direct", shape, ttft, 0.01)


def _planner(models: LatencyModels, **scoring) -> SLOPlanner:
    config = ScoringConfig(**scoring)
    return SLOPlanner(models, make_policy("slo", config), config, 128, headroom=0.1)


def test_cold_models_fall_back_to_the_heuristic():
    planner = _planner(LatencyModels(min_samples=8))
    request = ScoreInput(8, ["a", "b"], {"b": PodCache(8, ("GPU",) * 8)})
    choice = planner.choose(request, 1024, SLO(0.001))
    assert choice.decision.pod == "b" and choice.meets and choice.prediction is None
    assert "latency model not used" in choice.decision.reason


def test_a_cache_hit_lowers_predicted_ttft_and_wins_on_a_slow_pod():
    models = LatencyModels()
    _warm(models, "fast", per_ktoken=0.10)
    _warm(models, "slow", per_ktoken=0.30)
    planner = _planner(models)
    cold = ScoreInput(24, ["fast", "slow"])
    assert planner.choose(cold, 3072, SLO(1.0)).decision.pod == "fast"
    # the slow pod holds 20 of the 24 blocks: 512 uncached tokens there against 3072
    cached = ScoreInput(24, ["fast", "slow"], {"slow": PodCache(20, ("CPU",) * 20)})
    choice = planner.choose(cached, 3072, SLO(1.0))
    assert choice.decision.pod == "slow", choice.decision.reason
    assert choice.prediction.ttft_s == pytest.approx(0.01 + 0.3 * 0.512, abs=0.02)
    assert choice.meets


def test_an_unmeetable_slo_is_reported_and_saturated_pods_are_passed_over():
    models = LatencyModels()
    _warm(models, "a", per_ktoken=0.1)
    _warm(models, "b", per_ktoken=0.1)
    planner = _planner(models, max_waiting=2)
    request = ScoreInput(16, ["a", "b"])
    assert not planner.choose(request, 2048, SLO(ttft_s=0.05)).meets  # needs ~0.2 s
    assert planner.choose(request, 2048, SLO(ttft_s=0.5)).meets
    # headroom: predicted 0.215 s against 0.23 s is within the SLO but not within 90% of it
    assert not planner.choose(request, 2048, SLO(ttft_s=0.23)).meets
    busy = ScoreInput(16, ["a", "b"], loads={"a": PodLoad(num_waiting=2)})
    assert planner.choose(busy, 2048, SLO(1.0)).decision.pod == "b"
    assert not planner.all_saturated(busy)
    both = ScoreInput(16, ["a", "b"], loads={"a": PodLoad(2), "b": PodLoad(num_waiting=3)})
    assert planner.all_saturated(both)
    assert "all candidates saturated" in planner.choose(both, 2048, SLO(1.0)).decision.reason


def test_in_flight_beyond_the_running_batch_counts_as_queued():
    load = PodLoad(num_waiting=0, num_running=2, num_in_flight=5)
    assert estimated_waiting(load) == 3
    assert is_saturated(load, ScoringConfig(max_waiting=3))
    assert not is_saturated(PodLoad(num_running=4, num_in_flight=4), ScoringConfig(max_waiting=1))


def test_requests_not_answering_yet_are_the_prefill_work_ahead_of_a_new_one():
    """The router counts what it sent a pod that has not begun answering, with its uncached
    tokens, at once (the pod's gauges lag a scrape): a new request's TTFT features."""
    pod = PodState(PodSpec.parse("http://pod-a"))
    cold, _ = Sending(pod, 1500), Sending(pod, 40)
    assert (pod.in_flight, pod.prefilling, pod.prefill_tokens) == (2, 2, 1540)
    # each send counts as an arrival: the pod's load carries its recent rate
    assert pod.current_load().arrival_rate == pytest.approx(2 / pod.arrivals.window_s, rel=0.01)
    cold.answering()
    cold.answering()  # once only
    assert (pod.in_flight, pod.prefilling, pod.prefill_tokens) == (2, 1, 40)
    load = PodLoad(num_running=0, num_in_flight=2, num_prefilling=1, prefill_tokens=40)
    shape = request_shape(ScoreInput(4, ["pod-a"], loads={"pod-a": load}), "pod-a", 600, 128)
    assert (shape.uncached_tokens, shape.ahead_tokens, shape.active) == (600, 40, 1)
    assert shape.arrival_rate == 0.0
    load = PodLoad(arrival_rate=1.5)
    shape = request_shape(ScoreInput(4, ["pod-a"], loads={"pod-a": load}), "pod-a", 600, 128)
    assert shape.arrival_rate == 1.5
    # a scrape that saw more running than the router knows answering wins
    load = PodLoad(num_running=3, num_in_flight=2, num_prefilling=1, prefill_tokens=40)
    assert (
        request_shape(ScoreInput(4, ["pod-a"], loads={"pod-a": load}), "pod-a", 600, 128).active
        == 3
    )


def test_a_request_whose_slo_is_out_of_reach_is_refused_unless_served_late():
    """Past saturation a request that waited until not even an idle pod can make what is left
    of its SLO must not be dispatched (it would only make others late): it is refused (429).
    One out of reach on arrival (a long cold prompt against a tight SLO) is served best
    effort while its pod is idle, and refused while it is busy: a 2 s prefill there would
    make the requests that can meet their SLOs late, and stall the answers decoding there."""
    config = parse_config(["--pod", "http://a:1", "--policy", "slo"], environ={})
    registry = PodRegistry(config.pods, None)
    for pod in registry.pods.values():
        pod.healthy, pod.hashes_ok = True, True
    policy = make_policy("slo", config.scoring_config())
    decider = Decider(config, registry, InMemoryIndex(), None, policy, RouterMetrics())
    _warm(decider.latency, "http://a:1", per_ktoken=0.3)  # 1000 cold tokens: ~0.31 s

    def judge(request_class: RequestClass, waited_s: float) -> Verdict:
        return decider._judge([], 0, {}, 1000, request_class, None, waited_s)

    plain = RequestClass(SLO(ttft_s=0.5))
    critical = RequestClass(SLO(ttft_s=0.5), 5, objective="critical")
    assert judge(plain, 0.0) == judge(critical, 0.0) == "admit"  # 0.31 s of 0.5: on time
    assert judge(plain, 0.3) == "refuse"  # 0.2 s left: no pod, however idle, makes it
    assert judge(critical, 0.3) == "admit"  # critical traffic is served, late
    hopeless = RequestClass(SLO(ttft_s=0.1))  # its own miss: best effort on an idle pod
    assert judge(hopeless, 0.0) == "admit"
    with registry.sending("http://a:1", 0) as answering:  # a request decoding there
        answering.answering()
        assert judge(hopeless, 0.0) == "refuse"
        assert judge(plain, 0.0) == "admit"  # on time: its short prefill is no stall
    with registry.sending("http://a:1", 40):  # a short prompt ahead
        assert judge(hopeless, 0.0) == "refuse"
    with registry.sending("http://a:1", 1500):  # a cold prompt ahead: ~0.45 s
        assert judge(hopeless, 0.0) == "refuse"
        assert judge(RequestClass(SLO(ttft_s=0.1), 0, objective="critical"), 0.0) == "admit"
        assert judge(plain, 0.0) == "wait"  # late only because of the load: it may wait


def test_a_plain_request_is_never_held_back_while_one_with_an_objective_is():
    """No SLO, no objective, no fairness id: admitted at once even with every pod saturated,
    as kv_aware sends it (the default policy must not queue traffic that asks for nothing);
    one that names an objective or a fairness id still waits for a pod with room (or is
    shed, if sheddable)."""
    config = parse_config(["--pod", "http://a:1", "--policy", "slo", "--max-waiting", "2"], {})
    registry = PodRegistry(config.pods, None)
    for pod in registry.pods.values():
        pod.healthy, pod.hashes_ok = True, True
    decider = Decider(config, registry, InMemoryIndex(), None, make_policy("slo"), RouterMetrics())

    def judge(request_class: RequestClass) -> Verdict:
        return decider._judge([], 0, {}, 100, request_class, None, 0.0)

    with registry.sending("http://a:1", 10), registry.sending("http://a:1", 10):
        assert decider.planner is not None
        assert decider.planner.all_saturated(ScoreInput(0, ["http://a:1"], {}, registry.loads()))
        assert judge(RequestClass(SLO())) == "admit"
        assert judge(RequestClass(SLO(), 0, objective="batch")) == "wait"
        assert judge(RequestClass(SLO(), 0, fairness_id="tenant-a")) == "wait"  # fair turns


def test_best_effort_never_takes_the_last_pod_free_of_prompts():
    """A request out of reach on arrival is served best effort on an idle pod only while
    another pod has no prompt ahead either: with every pod on such prompts, the next request
    that could meet its SLO would have nowhere to go."""
    pods = ["http://a:1", "http://b:2"]
    argv = ["--pod", pods[0], "--pod", pods[1], "--policy", "slo"]
    config = parse_config(argv, environ={})
    registry = PodRegistry(config.pods, None)
    for pod in registry.pods.values():
        pod.healthy, pod.hashes_ok = True, True
    policy = make_policy("slo", config.scoring_config())
    decider = Decider(config, registry, InMemoryIndex(), None, policy, RouterMetrics())
    for pod in pods:
        _warm(decider.latency, pod, per_ktoken=0.3)
    hopeless = RequestClass(SLO(ttft_s=0.1))  # 1000 cold tokens: ~0.31 s on an idle pod

    def judge() -> Verdict:
        return decider._judge([], 0, {}, 1000, hopeless, None, 0.0)

    assert judge() == "admit"  # both pods free: one takes it, the other stays free
    with registry.sending(pods[0], 1500):  # a's prompt ahead: b would be the last free pod
        assert judge() == "refuse"
    with registry.sending(pods[0], 0) as answering:  # a only decodes: still free of prompts
        answering.answering()
        assert judge() == "admit"


def test_a_refused_request_is_answered_at_once_and_holds_up_no_one():
    """A verdict of "refuse" on arrival is a 429 at once; a queued request refused when
    judged again is taken out, and the one behind it is judged in the same pump."""
    from aiohttp import web

    async def run() -> None:
        admission = Admission(10, queue_timeout_s=5.0, retry_after_s=1, metrics=RouterMetrics())
        try:
            started = time.monotonic()
            with pytest.raises(web.HTTPTooManyRequests):
                await admission.admit(RequestClass(SLO(ttft_s=5.0)), lambda w: "refuse")
            assert time.monotonic() - started < 0.05
            free = [False]
            head_verdicts: list[Verdict] = []

            def head(waited_s: float) -> Verdict:
                verdict: Verdict = "wait" if not free[0] else "refuse"
                head_verdicts.append(verdict)
                return verdict

            first = asyncio.ensure_future(admission.admit(RequestClass(SLO(ttft_s=5.0)), head))
            await asyncio.sleep(0.01)
            second = asyncio.ensure_future(
                admission.admit(
                    RequestClass(SLO(ttft_s=9.0)), lambda w: "admit" if free[0] else "wait"
                )
            )
            await asyncio.sleep(0.01)
            free[0] = True
            admission.pump()
            assert (await second)[0] == "queued"
            with pytest.raises(web.HTTPTooManyRequests):
                await first
            assert head_verdicts[-1] == "refuse" and len(admission.queue) == 0
        finally:
            admission.stop()

    asyncio.run(run())


def test_the_heuristics_pod_is_left_only_for_one_surely_on_time():
    """`slo` routes as kv_aware (affinity keeps the next requests on time) unless that pod is
    predicted late and another is predicted well within the SLO (DIVERT_RATIO)."""
    models = LatencyModels()
    _warm(models, "slow", per_ktoken=0.1, base=1.0)  # its cache hits still take 1 s
    _warm(models, "fast", per_ktoken=0.1)
    planner = _planner(models)
    request = ScoreInput(16, ["fast", "slow"], {"slow": PodCache(16, ("GPU",) * 16)})
    # fast computes 2048 tokens in ~0.21 s: 0.42 of a 0.5 s SLO, surely on time
    diverted = planner.choose(request, 2048, SLO(0.5))
    assert diverted.decision.pod == "fast" and diverted.meets
    # 0.7 of a 0.3 s SLO is on time, but not surely: the prefix's pod keeps it (late)
    kept = planner.choose(request, 2048, SLO(0.3))
    assert kept.decision.pod == "slow" and not kept.meets
    # and with time to spare on both, affinity decides
    assert planner.choose(request, 2048, SLO(5.0)).decision.pod == "slow"


def test_a_request_without_slos_goes_where_the_heuristic_sends_it():
    """No SLO to meet, no diversion: the prefix's pod keeps it, however much faster another
    pod is predicted (the fastest pod each time spreads prefixes); a prefill pod for a P/D step
    is still the one predicted to finish the prompt first."""
    models = LatencyModels()
    _warm(models, "slow", per_ktoken=0.1, base=1.0)
    _warm(models, "fast", per_ktoken=0.1)
    for pod in ("slow", "fast"):  # and as prefill pods, with the same speeds
        for sample in range(40):
            shape = RequestShape(100 * sample, 0, 0, 0)
            base = 1.0 if pod == "slow" else 0.01
            models.observe(pod, "prefill", shape, base + 0.1 * sample / 10, None)
    planner = _planner(models)
    request = ScoreInput(16, ["fast", "slow"], {"slow": PodCache(16, ("GPU",) * 16)})
    choice = planner.choose(request, 2048, SLO())
    assert choice.decision.pod == "slow" and choice.meets, choice.decision.reason
    assert choice.decision.reason.startswith("kv_aware:") and "(no SLO)" in choice.decision.reason
    assert choice.shape.cached_tokens == 2048
    prefill = planner.choose(request, 2048, SLO(), mode="prefill")
    assert prefill.decision.pod == "fast", prefill.decision.reason


def test_the_prefill_work_ahead_is_timed_from_when_the_pod_took_it_on():
    """`ahead_since`: when work reached an empty prefill queue, or the pod's last first token
    since (an engine step ended and took the queue on); none while nothing is ahead. A P/D
    decode (no tokens to compute) starts no clock."""
    now = [10.0]
    pod = PodState(PodSpec.parse("http://pod-a"), clock=lambda: now[0])
    assert pod.current_load().prefill_elapsed_s == 0.0
    pulled = Sending(pod, 0)
    now[0] = 11.0
    assert pod.ahead_since is None and pod.current_load().prefill_elapsed_s == 0.0
    cold = Sending(pod, 1500)
    now[0] = 11.3
    cached = Sending(pod, 40)  # joins the queue: the clock runs on from the cold one's send
    now[0] = 11.4
    assert pod.current_load().prefill_elapsed_s == pytest.approx(0.4)
    now[0] = 11.5
    cold.answering()  # its step ended: the cached prompt's starts now
    now[0] = 11.52
    assert pod.current_load().prefill_elapsed_s == pytest.approx(0.02)
    pulled.answering()  # a first token with work still ahead: a step ended then too
    assert pod.current_load().prefill_elapsed_s == 0.0
    cached.answering()
    assert pod.ahead_since is None and pod.current_load().prefill_elapsed_s == 0.0
    with pytest.raises(ValueError, match="prefill_elapsed_s"):
        PodLoad(prefill_elapsed_s=-1.0)


def test_a_request_sent_into_a_prefill_waits_for_what_is_left_of_it():
    """A pod computes its prompts one after another, 0.3 s per 1k uncached tokens: a request
    waits for what is left of the work ahead (all of it, less what the pod did since it took
    it on). A fit that counted all the tokens ahead, as it did, cannot tell a request sent
    as a 1500-token prefill began from one sent as it ended; with the time elapsed it can."""
    rng = np.random.default_rng(3)
    models = LatencyModels(min_samples=8, forget=0.98)
    for _ in range(400):
        uncached = int(rng.choice([40, 1500]))
        ahead = int(rng.choice([0, 1500, 3000]))
        elapsed = float(rng.uniform(0, 0.3 * ahead / 1000))
        shape = RequestShape(uncached, 0, ahead, 0, ahead_elapsed_s=elapsed)
        left = 0.3 * ahead / 1000 - elapsed
        ttft = (0.01 + 0.3 * uncached / 1000 + left) * rng.normal(1.0, 0.02)
        models.observe("p", "direct", shape, float(ttft), None)
    for ahead, elapsed in ((1500, 0.0), (1500, 0.2), (3000, 0.5)):
        shape = RequestShape(40, 0, ahead, 0, ahead_elapsed_s=elapsed)
        expected = 0.01 + 0.012 + 0.3 * ahead / 1000 - elapsed
        predicted = models.predict("p", "direct", shape).ttft_s
        assert predicted == pytest.approx(expected, rel=0.1), (ahead, elapsed)
    # the shape carries the elapsed time from the pod's load
    load = PodLoad(num_in_flight=1, num_prefilling=1, prefill_tokens=1500, prefill_elapsed_s=0.4)
    shape = request_shape(ScoreInput(4, ["pod-a"], loads={"pod-a": load}), "pod-a", 600, 128)
    assert (shape.ahead_tokens, shape.ahead_elapsed_s) == (1500, 0.4)


def test_cached_tokens_are_counted_per_tier_and_each_tier_learns_its_own_cost():
    """A prefix held only in host memory or on disk is loaded into new device blocks before
    the prompt runs: it costs more than a device hit, by tier. The shape counts the cached
    tokens per tier from the index, and the fit tells the tiers apart (a fit of cached tokens
    alone misses host hits by their load and predicts device hits high); a pod that never
    loaded from a tier predicts its tokens as device hits."""
    cache = PodCache(6, ("GPU", "GPU", "CPU", "CPU", "STORAGE", "SHARED"))
    request = ScoreInput(6, ["pod-a"], {"pod-a": cache})
    shape = request_shape(request, "pod-a", 6 * 128 + 40, 128)
    assert (shape.uncached_tokens, shape.cached_tokens) == (40, 768)
    assert (shape.host_tokens, shape.storage_tokens) == (256, 256)
    # a prompt that ends inside its last cached block: the tiers stay within what is cached
    short = request_shape(request, "pod-a", 6 * 128 - 64, 128)
    assert short.cached_tokens == 6 * 128 - 64 and short.host_tokens + short.storage_tokens <= 704
    with pytest.raises(ValueError, match="within the cached ones"):
        RequestShape(10, 100, 0, 0, host_tokens=80, storage_tokens=40)

    def truth(shape: RequestShape) -> float:
        cached = shape.cached_tokens - shape.host_tokens - shape.storage_tokens
        costs = 0.3 * shape.uncached_tokens + 0.02 * cached
        return 0.01 + (costs + 0.15 * shape.host_tokens + 0.6 * shape.storage_tokens) / 1000

    rng = np.random.default_rng(7)
    models = LatencyModels(min_samples=8)
    for _ in range(600):
        cached = int(rng.integers(0, 16)) * 128
        tier = int(rng.integers(0, 3))
        shape = RequestShape(
            int(rng.integers(20, 400)),
            cached,
            0,
            0,
            host_tokens=cached if tier == 1 else 0,
            storage_tokens=cached if tier == 2 else 0,
        )
        models.observe("p", "direct", shape, truth(shape) * float(rng.normal(1.0, 0.02)), None)
    for tier in ("device", "host", "storage"):
        shape = RequestShape(
            100,
            1536,
            0,
            0,
            host_tokens=1536 if tier == "host" else 0,
            storage_tokens=1536 if tier == "storage" else 0,
        )
        predicted = models.predict("p", "direct", shape).ttft_s
        assert predicted == pytest.approx(truth(shape), rel=0.05), tier
    # a pod whose loads were never seen: a host hit costs what a device hit does
    fresh = LatencyModels(min_samples=8)
    for _ in range(50):
        shape = RequestShape(int(rng.integers(20, 400)), int(rng.integers(0, 16)) * 128, 0, 0)
        fresh.observe("p", "direct", shape, truth(shape), None)
    device = fresh.predict("p", "direct", RequestShape(100, 1536, 0, 0)).ttft_s
    host = fresh.predict("p", "direct", RequestShape(100, 1536, 0, 0, host_tokens=1536)).ttft_s
    assert host == pytest.approx(device, rel=1e-6)


def test_the_fit_weighs_relative_errors_so_short_answers_are_predicted_as_well():
    """Long prompts also wait on work the features do not show (a queue the router cannot
    see: seconds, at random). A fit of absolute errors spends itself on those seconds, and its
    intercept and per-token cost wander with them: it missed the short answers by ~20%
    (seeds 0-3). A fit of relative errors, the models', keeps them within 10%, and the long
    ones no worse: an SLO is a ratio."""
    rng = np.random.default_rng(0)
    models = LatencyModels(min_samples=8)
    errors: dict[bool, list[float]] = {True: [], False: []}
    for i in range(1000):
        short = bool(rng.random() < 0.7)
        uncached = int(rng.integers(20, 200)) if short else int(rng.integers(1000, 2000))
        shape = RequestShape(uncached, 0, 0, 0)
        ttft = float((0.02 + 0.3 * uncached / 1000) * rng.normal(1.0, 0.03))
        if not short:
            ttft += float(rng.exponential(0.3))
        if i >= 200:
            predicted = models.predict("p", "direct", shape).ttft_s
            assert predicted is not None
            errors[short].append(abs(predicted - ttft) / ttft)
        models.observe("p", "direct", shape, ttft, None)
    assert np.median(errors[True]) < 0.1, np.median(errors[True])
    assert np.median(errors[False]) < 0.25, np.median(errors[False])
    with pytest.raises(ValueError, match="weight"):
        ForgettingRidge(5).update(np.ones(5), 1.0, weight=0.0)


def test_a_pod_that_turns_slow_is_believed_within_a_few_dozen_answers():
    """Weighted by 1/y², a pod's 5 ms answers outweigh its 2 s ones 160,000 to 1: forgetting
    alone would follow the change after hundreds of answers. Misses that keep leaning one
    way make the fit forget faster; answers that scatter around it (a stable pod) do not."""
    models = LatencyModels(min_samples=1)
    shape = RequestShape(100, 0, 0, 0)
    for _ in range(100):
        models.observe("p", "direct", shape, 0.005, None)
    assert models.predict("p", "direct", shape).ttft_s == pytest.approx(0.005, rel=0.05)
    for _ in range(40):
        models.observe("p", "direct", shape, 2.0, None)
    assert models.predict("p", "direct", shape).ttft_s == pytest.approx(2.0, rel=0.2)
    # a stable pod whose answers scatter by 30% keeps its history: its fit stays put
    rng = np.random.default_rng(5)
    fit = ForgettingRidge(2)
    for _ in range(500):
        fit.update(np.array([1.0, 0.0]), float(rng.uniform(0.7, 1.3)), 1.0)
    assert fit.predict(np.array([1.0, 0.0])) == pytest.approx(1.0, rel=0.1)
    assert abs(fit._drift) < DRIFT_LIMIT
