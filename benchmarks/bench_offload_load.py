"""Offload under load: what the tiers cost a cold prompt, and what they give many streams.

Part 1, the cold path (`--part cold`): a plain vLLM, one with LLMDConnector and no tier, and
one with its host tier, all up at once and bound to the same core, answer unique long prompts
(nothing to hit) in turns, ordered ABC CBA so drift and order cancel. It prints each one's
median TTFT and the ratios: the stores of a computed prompt must stay off its step's critical
path.

Part 2, concurrency (`--part load`): `--streams` closed-loop clients send long prompts whose
working set is `--working-set-x` times the device cache, to plain vLLM (offload off), the host
tier, and the disk tier behind a host tier of a few chunks, all up at once on one core. Two
workloads: `recurring` (each prompt asked `--recurrences` times, in random order) and `unique`
(every prompt new), each run `--rounds` times with fresh prompts, the systems taking turns
(ABC CBA, as in part 1: one after the other, the box's drift landed on whichever ran second).
It prints throughput against offload off (over all rounds, then per round), and TTFT by the
tier the prompt's KV was in when it was sent
(from the server's own KV events: device cache, host, disk, or cold), and writes a PNG of
TTFT by tier of origin (needs matplotlib: `pip install 'vllm-llmd[plot]'`).

Usage: `.venv/bin/python benchmarks/bench_offload_load.py [--part cold|load|both]`.
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import random
import statistics
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from vllm_llmd.devtools.client import timed_stream
from vllm_llmd.devtools.model_maker import PRESETS, cached_model, sample_text
from vllm_llmd.devtools.server import (
    VLLMServer,
    VLLMServerConfig,
    kv_events_config,
    llmd_connector,
)
from vllm_llmd.events.model import MEDIUM_CPU, MEDIUM_GPU, MEDIUM_STORAGE, BlockRemoved, BlockStored
from vllm_llmd.events.subscriber import Subscriber
from vllm_llmd.events.updates import ReceivedBatch

REPO_ROOT = Path(__file__).resolve().parents[1]
LOG_DIR = REPO_ROOT / "logs" / "bench_offload_load"
BLOCK = 128
# where a prompt's KV was when it was sent, fastest first
ORIGINS = ("device", "host", "disk", "cold")
_ORIGIN_OF_MEDIUM = {MEDIUM_GPU: "device", MEDIUM_CPU: "host", MEDIUM_STORAGE: "disk"}


def block_bytes(preset: str, dtype_bytes: int = 2) -> int:
    p = PRESETS[preset]
    return p.num_hidden_layers * p.num_key_value_heads * BLOCK * 2 * p.head_dim * dtype_bytes


# ---- part 1: the cold path -------------------------------------------------------------------


def bench_cold(args: argparse.Namespace, model: Path, prompts: PromptMaker) -> None:
    chunk = block_bytes(args.preset)
    prompt_blocks = -(-args.prompt_tokens // BLOCK)

    def config(extra: dict | None) -> VLLMServerConfig:
        return VLLMServerConfig(
            model=model,
            dtype="bfloat16",
            cpu_cores="0",  # both on one core: only the one answering runs
            kv_cache_bytes=(4 * prompt_blocks + 4) * chunk,
            block_size=BLOCK,
            max_model_len=(prompt_blocks + 2) * BLOCK,
            kv_transfer_config=None if extra is None else llmd_connector(extra=extra),
        )

    # the connector without tiers separates what the tier's stores cost from what selecting a
    # connector does to vLLM (it turns the hybrid KV cache manager off, for one)
    names = ("plain vLLM", "LLMDConnector, no tier", "LLMDConnector host tier")
    extras = (None, {}, {"host_offload_bytes": (8 * prompt_blocks) * chunk})
    ttfts: dict[str, list[float]] = {name: [] for name in names}
    with (
        VLLMServer(config(extras[0]), LOG_DIR / "cold-plain.log") as plain,
        VLLMServer(config(extras[1]), LOG_DIR / "cold-connector.log") as connector,
        VLLMServer(config(extras[2]), LOG_DIR / "cold-host.log") as host,
    ):
        servers = dict(zip(names, (plain, connector, host), strict=True))
        for k, server in enumerate(servers.values()):  # warm-up: graphs, allocator, threads
            for i in range(2):
                timed_stream(server.url, server.model_name, prompts.tokens(90_000 + 10 * k + i), 1)
        seed = 100_000
        for round_ in range(args.cold_prompts):
            order = names if round_ % 2 == 0 else names[::-1]  # ABC CBA
            for name in order:
                server = servers[name]
                seed += 1
                timing = timed_stream(server.url, server.model_name, prompts.tokens(seed), 1)
                ttfts[name].append(timing.ttft_s)
                time.sleep(0.3)  # the core is idle between prompts, as for a lone user
    base = statistics.median(ttfts[names[0]])
    print(
        f"\n== cold path: TTFT of unique {args.prompt_tokens}-token prompts ({args.preset}, bf16, "
        f"all servers on core 0, {args.cold_prompts} each, ABC CBA order)"
    )
    for name in names:
        median = statistics.median(ttfts[name])
        print(
            f"  {name:<26} median {median:6.3f} s  p90 {quantile(ttfts[name], 0.9):6.3f} s  "
            f"{median / base:6.3f}x plain"
        )
    for base_name in names[:2]:
        paired = [h / b for b, h in zip(ttfts[base_name], ttfts[names[2]], strict=True)]
        print(f"  paired ratio host tier / {base_name}: median {statistics.median(paired):.3f}")


# ---- part 2: concurrency ---------------------------------------------------------------------


class PromptMaker:
    """Distinct long prompts (token ids) by seed, and which prompt block a block's tokens are."""

    def __init__(self, tokenizer: Tokenizer, prompt_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.prompt_tokens = prompt_tokens
        self.block_of: dict[tuple[int, ...], tuple[int, int]] = {}

    def tokens(self, seed: int) -> list[int]:
        ids = self.tokenizer.encode(sample_text(self.prompt_tokens, seed=seed)).ids
        ids = ids[: self.prompt_tokens]
        for i in range(len(ids) // BLOCK):
            self.block_of[tuple(ids[i * BLOCK : (i + 1) * BLOCK])] = (seed, i)
        return ids


class TierTracker:
    """Which tiers hold each prompt block, from the server's KV events (a thread polls them)."""

    def __init__(self, endpoint: str, replay: str, prompts: PromptMaker) -> None:
        self.prompts = prompts
        self.subscriber = Subscriber(endpoint, replay_endpoint=replay, topic="kv")
        self.block_of_hash: dict[object, tuple[int, int]] = {}
        self.tiers: dict[tuple[int, int], set[str]] = defaultdict(set)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for update in self.subscriber.poll(timeout=0.05):
                if isinstance(update, ReceivedBatch):
                    with self._lock:
                        for event in update.events:
                            self._apply(event)

    def _apply(self, event: object) -> None:
        if isinstance(event, BlockStored):
            medium = event.medium or MEDIUM_GPU
            tokens = list(event.token_ids)
            for i, block_hash in enumerate(event.block_hashes):
                block = self.prompts.block_of.get(tuple(tokens[i * BLOCK : (i + 1) * BLOCK]))
                if block is not None:
                    self.block_of_hash[block_hash] = block
                    self.tiers[block].add(medium)
        elif isinstance(event, BlockRemoved):
            medium = event.medium or MEDIUM_GPU
            for block_hash in event.block_hashes:
                block = self.block_of_hash.get(block_hash)
                if block is not None:
                    self.tiers[block].discard(medium)

    def origin(self, seed: int, num_blocks: int) -> str:
        """The slowest tier the prompt's held prefix needs (device < host < disk), or cold."""
        with self._lock:
            slowest = -1
            for i in range(num_blocks):
                held = [ORIGINS.index(_ORIGIN_OF_MEDIUM[m]) for m in self.tiers[(seed, i)]]
                if not held:
                    break
                slowest = max(slowest, min(held))
        return ORIGINS[slowest] if slowest >= 0 else "cold"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.subscriber.close()


@dataclass
class Outcome:
    origin: str
    ttft_s: float


def run_load(
    server: VLLMServer, tracker: TierTracker, seeds: list[int], streams: int, prompts: PromptMaker
) -> tuple[float, list[Outcome]]:
    """Closed loop: `streams` clients take the next prompt until none is left. (wall s, outcomes)"""
    tokens = {seed: prompts.tokens(seed) for seed in set(seeds)}
    work: queue.Queue[int] = queue.Queue()
    for seed in seeds:
        work.put(seed)
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def client() -> None:
        while True:
            try:
                seed = work.get_nowait()
            except queue.Empty:
                return
            origin = tracker.origin(seed, len(tokens[seed]) // BLOCK)
            timing = timed_stream(server.url, server.model_name, tokens[seed], max_tokens=8)
            with lock:
                outcomes.append(Outcome(origin, timing.ttft_s))

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, outcomes


def bench_load(args: argparse.Namespace, model: Path, prompts: PromptMaker) -> None:
    chunk = block_bytes(args.preset)
    prompt_blocks = args.prompt_tokens // BLOCK
    device_blocks = args.device_prompts * prompt_blocks
    num_distinct = args.working_set_x * args.device_prompts
    disk = Path(tempfile.mkdtemp(prefix="llmd-bench-load-disk-"))
    systems = {
        "offload off (plain vLLM)": None,
        "host tier": {"host_offload_bytes": (num_distinct + 4) * prompt_blocks * chunk},
        "disk tier, 4-chunk host": {
            "host_offload_bytes": 4 * chunk,
            "disk_offload_path": str(disk),
        },
    }
    if args.systems:
        keep = [list(systems)[int(i)] for i in args.systems.split(",")]
        systems = {name: systems[name] for name in keep}
    names = list(systems)
    workload_names = args.workloads.split(",")
    # per (system, workload): the seconds of each round, and every outcome
    walls: dict[tuple[str, str], list[float]] = defaultdict(list)
    outcomes_of: dict[tuple[str, str], list[Outcome]] = defaultdict(list)
    with contextlib.ExitStack() as stack:
        servers: dict[str, tuple[VLLMServer, TierTracker]] = {}
        for k, (name, extra) in enumerate(systems.items()):  # all up, all on core 0
            events = kv_events_config()
            config = VLLMServerConfig(
                model=model,
                dtype="bfloat16",
                cpu_cores="0",
                kv_cache_bytes=device_blocks * chunk,
                block_size=BLOCK,
                max_model_len=(prompt_blocks + 2) * BLOCK,
                kv_transfer_config=None if extra is None else llmd_connector(extra=extra),
                kv_events_config=events,
            )
            server = stack.enter_context(VLLMServer(config, LOG_DIR / f"load-system{k}.log"))
            endpoint = events["endpoint"].replace("*", "127.0.0.1")
            replay = events["replay_endpoint"].replace("*", "127.0.0.1")
            tracker = TierTracker(endpoint, replay, prompts)
            stack.callback(tracker.close)
            timed_stream(server.url, server.model_name, prompts.tokens(99_999)[:64], 2)
            servers[name] = (server, tracker)
        for round_ in range(args.rounds):
            # each round its own prompts, every system the same ones, in ABC CBA order so
            # drift on the box lands on every system alike
            workloads = round_workloads(args, num_distinct, round_)
            order = names if round_ % 2 == 0 else names[::-1]
            for workload in workload_names:
                for name in order:
                    server, tracker = servers[name]
                    wall, outcomes = run_load(
                        server, tracker, workloads[workload], args.streams, prompts
                    )
                    walls[(name, workload)].append(wall)
                    outcomes_of[(name, workload)] += outcomes
    results = {key: (sum(walls[key]), outcomes_of[key]) for key in walls}
    print(
        f"\n== {args.streams} concurrent streams, {args.prompt_tokens}-token prompts "
        f"({args.preset}, bf16, all servers on core 0), device cache of {args.device_prompts} "
        f"prompts, working set {args.working_set_x}x it ({num_distinct} prompts), "
        f"{args.rounds} rounds in ABC CBA order"
    )
    print(
        f"  {'system':<26}{'workload':<11}{'req/s':>7}{'vs off':>8}{'per round':>18}"
        "  TTFT p50 by origin (count)"
    )
    for workload in workload_names:
        base = names[0]
        for name in names:
            wall, outcomes = results[(name, workload)]
            n = len(outcomes)
            by_origin = _by_origin(outcomes)
            rounds = ", ".join(
                f"{b / w:.2f}"
                for b, w in zip(walls[(base, workload)], walls[(name, workload)], strict=True)
            )
            cells = "  ".join(
                f"{o} {statistics.median(t):.2f}s ({len(t)})" for o, t in by_origin.items()
            )
            ratio = results[(base, workload)][0] / wall
            print(f"  {name:<26}{workload:<11}{n / wall:7.2f}{ratio:7.2f}x{rounds:>18}  {cells}")
    plot(results, systems, LOG_DIR / "ttft_by_origin.png")


def round_workloads(args: argparse.Namespace, num_distinct: int, round_: int) -> dict:
    """The round's prompt seeds: `recurring` (each of num_distinct prompts asked
    --recurrences times, shuffled) and `unique` (as many, every one new)."""
    rng = random.Random(round_)
    first = 1000 + 100_000 * round_
    recurring = list(range(first, first + num_distinct)) * args.recurrences
    rng.shuffle(recurring)
    unique = list(range(first + 5000, first + 5000 + len(recurring)))
    return {"recurring": recurring, "unique": unique}


def _by_origin(outcomes: list[Outcome]) -> dict[str, list[float]]:
    counts = Counter(o.origin for o in outcomes)
    return {
        origin: [o.ttft_s for o in outcomes if o.origin == origin]
        for origin in ORIGINS
        if counts[origin]
    }


def plot(results: dict, systems: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (no plot: pip install 'vllm-llmd[plot]')")
        return
    workloads = {workload for _, workload in results}
    workload = "recurring" if "recurring" in workloads else workloads.pop()
    fig, _ = plt.subplots(1, len(systems), figsize=(5 * len(systems), 4), sharey=True)
    for ax, name in zip(list(fig.axes), systems, strict=True):
        _, outcomes = results[(name, workload)]
        by_origin = _by_origin(outcomes)
        ax.boxplot(list(by_origin.values()), tick_labels=list(by_origin))
        ax.set_title(f"{name}\n({workload} prompts)")
        ax.set_xlabel("where the prompt's KV was when sent")
    fig.axes[0].set_ylabel("TTFT (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"  plot: {path}")


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="both", choices=("cold", "load", "both"))
    parser.add_argument("--preset", default="medium", choices=sorted(PRESETS))
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--cold-prompts", type=int, default=12, help="per system (part 1)")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--device-prompts", type=int, default=4, help="prompts the cache holds")
    parser.add_argument("--working-set-x", type=int, default=4)
    parser.add_argument("--recurrences", type=int, default=4)
    parser.add_argument(
        "--systems", default="", help="part 2: only these, by index (0 off, 1 host, 2 disk)"
    )
    parser.add_argument(
        "--workloads", default="recurring,unique", help="part 2: recurring, unique or both"
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="part 2: rounds of fresh prompts, ABC CBA order"
    )
    args = parser.parse_args()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    model = cached_model(args.preset, REPO_ROOT / ".cache" / "models")
    prompts = PromptMaker(Tokenizer.from_file(str(model / "tokenizer.json")), args.prompt_tokens)
    if args.part in ("cold", "both"):
        bench_cold(args, model, prompts)
    if args.part in ("load", "both"):
        bench_load(args, model, prompts)


if __name__ == "__main__":
    main()
