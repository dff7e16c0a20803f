"""`vllm-llmd-sim`: run the cluster simulator, or calibrate a latency profile.

    vllm-llmd-sim run --workload llmd --pods 16,64,256 --policies round_robin,prefix,kv_aware \
        --requests 100000 --rate 8 [--profile profile.json] [--plot logs/sim.png]
    vllm-llmd-sim calibrate http://127.0.0.1:8000 --out profile.json

`--rate` is requests per second *per pod*, so one load level holds across pod counts (a
trace keeps its own timestamps; `--time-scale` stretches them).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Iterator, Sequence

from vllm_llmd.hashing import PrefixHasher
from vllm_llmd.router.scoring import PolicyName
from vllm_llmd.router.slo import SLO
from vllm_llmd.sim.metrics import HEADER, table
from vllm_llmd.sim.pod import PodConfig
from vllm_llmd.sim.profile import H100_LLAMA_8B, load_profile, save_profile
from vllm_llmd.sim.router import RouterSettings
from vllm_llmd.sim.run import COPYING, SimConfig, SweepPoint, Workload, sweep
from vllm_llmd.sim.workloads import (
    ChatShape,
    SharedPrefixShape,
    SimRequest,
    mooncake_trace,
    multi_turn,
    shared_prefix,
)

WORKLOADS = ("llmd", "chat", "mooncake")


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _policies(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    known = {p.value for p in PolicyName}
    # NAME+copy: the policy with hot-prefix copies (--replicate-hot-prefixes, else 3)
    unknown = [n for n in names if n.removesuffix(COPYING) not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown policies {unknown}; known: {sorted(known)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-llmd-sim", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="simulate policies at pod counts on a workload")
    run.add_argument("--workload", choices=WORKLOADS, default="llmd")
    run.add_argument("--trace", help="Mooncake-format JSONL (workload mooncake)")
    run.add_argument("--time-scale", type=float, default=1.0, help="trace timestamps x this")
    run.add_argument("--pods", type=_ints, default=[16], help="pod counts, e.g. 16,64,256")
    run.add_argument("--policies", type=_policies, default=["round_robin", "prefix", "kv_aware"])
    run.add_argument("--requests", type=int, default=10_000)
    run.add_argument("--rate", type=float, default=8.0, help="requests/s per pod (Poisson)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--profile", help="latency profile JSON (default: assumed H100, 8B)")
    run.add_argument("--plot", help="write the figures to this PNG (e.g. logs/sim.png)")
    run.add_argument(
        "--slo",
        type=SLO.parse,
        default=SLO(0.5, 0.05),
        help="goodput targets, ms: ttft=500,tpot=50 (policy slo routes on them)",
    )
    pod = PodConfig()
    run.add_argument("--block-size", type=int, default=pod.block_size)
    run.add_argument("--capacity-blocks", type=int, default=pod.capacity_blocks)
    run.add_argument("--host-blocks", type=int, default=0, help="host tier blocks per pod")
    run.add_argument("--max-batched-tokens", type=int, default=pod.max_batched_tokens)
    run.add_argument("--event-delay-ms", type=float, default=20.0)
    run.add_argument("--recent-ttl-s", type=float, default=RouterSettings().recent_route_ttl_s)
    shape = SharedPrefixShape()
    run.add_argument("--groups", type=int, default=shape.num_groups)
    run.add_argument("--prefix-tokens", type=int, default=shape.prefix_tokens)
    run.add_argument("--suffix-tokens", type=int, default=shape.suffix_tokens)
    run.add_argument("--output-tokens", type=int, default=shape.output_tokens)
    run.add_argument(
        "--hot-share",
        type=float,
        default=shape.hot_share,
        help="llmd workload: share of requests on the hot group of the moment (0: none)",
    )
    run.add_argument(
        "--hot-every", type=int, default=shape.hot_every, help="a new hot group every N requests"
    )
    run.add_argument(
        "--closed-loop",
        action="store_true",
        help="chat workload: each turn a think time after the previous answer ends",
    )
    run.add_argument(
        "--replicate-hot-prefixes",
        type=int,
        default=0,
        help="the router's --replicate-hot-prefixes for policies named NAME+copy (default 3)",
    )
    run.add_argument(
        "--kv-room",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the router's --kv-room: a pod whose cache cannot hold a request is saturated for it",
    )
    run.add_argument(
        "--replicate-per-minute",
        type=int,
        default=RouterSettings().replicate_per_minute,
        help="the router's --replicate-per-minute",
    )
    run.add_argument(
        "--prefill-pace-tokens",
        type=int,
        default=RouterSettings().prefill_pace_tokens,
        help="the router's --prefill-pace-tokens (0: off)",
    )
    calibrate = commands.add_parser("calibrate", help="measure a vLLM server, write a profile")
    calibrate.add_argument("url")
    calibrate.add_argument("--out", required=True)
    calibrate.add_argument("--model", help="default: the first one the server lists")
    calibrate.add_argument("--lengths", type=_ints, default=[256, 1024, 2048, 4096])
    calibrate.add_argument("--batches", type=_ints, default=[1, 2, 4, 8])
    calibrate.add_argument("--output-tokens", type=int, default=32)
    return parser


def _workload(args: argparse.Namespace) -> Workload:
    """The requests for a pod count. A trace keeps its own times; llm-d-shaped requests are
    made and hashed once at one request per second and their arrivals rescaled (a Poisson
    process scales); chat is made again per pod count (its think times must not scale)."""
    hasher = PrefixHasher(args.block_size)
    if args.workload == "mooncake":
        if not args.trace:
            raise SystemExit("--workload mooncake needs --trace FILE")
        trace = list(mooncake_trace(args.trace, hasher, args.time_scale, args.requests))
        return lambda num_pods: iter(trace)
    if args.workload == "chat":
        chat = ChatShape(output_tokens=args.output_tokens, closed_loop=args.closed_loop)
        return lambda num_pods: multi_turn(
            hasher, args.requests, args.rate * num_pods, chat, args.seed
        )
    shape = SharedPrefixShape(
        args.groups,
        args.prefix_tokens,
        args.suffix_tokens,
        args.output_tokens,
        hot_share=args.hot_share,
        hot_every=args.hot_every,
    )
    requests = list(shared_prefix(hasher, args.requests, 1.0, shape, args.seed))
    return lambda num_pods: _at_rate(requests, args.rate * num_pods)


def _at_rate(requests: list[SimRequest], rate: float) -> Iterator[SimRequest]:
    for request in requests:
        yield dataclasses.replace(request, arrival_s=request.arrival_s / rate)


def run(args: argparse.Namespace) -> list[SweepPoint]:
    started = time.perf_counter()
    workload = _workload(args)
    made_s = time.perf_counter() - started
    config = SimConfig(
        num_pods=1,
        pod=PodConfig(
            capacity_blocks=args.capacity_blocks,
            block_size=args.block_size,
            max_batched_tokens=args.max_batched_tokens,
            host_capacity_blocks=args.host_blocks,
        ),
        profile=load_profile(args.profile) if args.profile else H100_LLAMA_8B,
        router=RouterSettings(
            slo=args.slo,
            event_delay_s=args.event_delay_ms / 1000.0,
            recent_route_ttl_s=args.recent_ttl_s,
            replicate_after=args.replicate_hot_prefixes,
            replicate_per_minute=args.replicate_per_minute,
            kv_room=args.kv_room,
            prefill_pace_tokens=args.prefill_pace_tokens,
        ),
        goodput_slo=args.slo,
    )
    print(f"{args.requests} requests ({args.workload}, made in {made_s:.1f} s)")
    print(f"profile: {config.profile.source}")
    print(HEADER)

    def show(point: SweepPoint) -> None:
        print(table([point.summary]).splitlines()[-1], flush=True)

    points = sweep(
        workload,
        args.pods,
        args.policies,
        config,
        show,
    )
    if args.plot:
        from vllm_llmd.sim.plots import plot_sweep

        print(f"plot: {plot_sweep(points, args.plot)}")
    return points


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "calibrate":
        from vllm_llmd.sim.calibrate import CalibrationPlan, calibrate

        plan = CalibrationPlan(args.lengths, args.batches, args.output_tokens)
        profile = calibrate(args.url, args.model, plan)
        save_profile(profile, args.out)
        print(f"wrote {args.out}: {profile}")
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
