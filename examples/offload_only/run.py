"""Offload only: one vLLM with LLMDConnector's host and disk tiers, and its KV events watched.

Starts one vLLM (`kv_both`, no P/D peer) whose LLMDConnector keeps evicted prefixes in a host
memory tier and, below it, a disk tier; vLLM's KV-event publisher is on, and
`python -m vllm_llmd.events watch` follows it. Then it sends chat requests whose long system
prompts ("prefixes") repeat: a first round over every prefix, then a second round in reverse
order. The tiers are sized small on purpose, so a few requests walk a block through every
state: computed on the device (medium GPU), copied to host memory (CPU), spilled to disk when
host memory is full (STORAGE), dropped when disk is full, and loaded back on a later hit.

After each request it prints where its prompt tokens came from (device prefix cache, loaded
from the tiers, computed) and the watcher's event lines that request caused; at the end, the
BlockStored/BlockRemoved counts per tier, the connector's counters and what the tiers hold.

On CPU it serves a tiny model made locally (no hub access). `--model` serves a real one (a
Hugging Face id or a folder; on a GPU box, with `--dtype auto`); size the tiers with
`--host-offload-mib` / `--disk-offload-mib` against that model's block size to see evictions.
"""

from __future__ import annotations

import argparse
import json
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

from vllm_llmd.devtools.client import metric_sum, scrape_metrics
from vllm_llmd.devtools.model_maker import PRESETS, cached_model, sample_text
from vllm_llmd.devtools.server import VLLMServer, VLLMServerConfig, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
LOG_DIR = REPO_ROOT / "logs" / "offload_only"
DEFAULT_DISK = LOG_DIR / "disk"
SOURCES = ("local_cache_hit", "external_kv_transfer", "local_compute")
COUNTERS = ("stored", "loaded", "spilled", "promoted", "rejected")
EVENT_LINE = re.compile(r"seq=\d+ (?P<kind>\w+)(?: medium=(?P<medium>\S+) blocks=(?P<n>\d+))?")
TIER_NAMES = {"GPU": "device", "CPU": "host", "STORAGE": "disk"}


class Watcher:
    """`python -m vllm_llmd.events watch` as a child; its lines are queued and tallied."""

    def __init__(self, endpoint: str, replay: str, log_path: Path) -> None:
        cmd = [sys.executable, "-u", "-m", "vllm_llmd.events", "watch", endpoint]
        cmd += ["--replay", replay, "--topic", "kv"]
        self.stderr = open(log_path, "wb")  # "watching ..." and the final summary
        self.process = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self.stderr, text=True, bufsize=1
        )
        self.lines: queue.Queue[str] = queue.Queue()
        # (event type, medium) -> blocks
        self.blocks: Counter[tuple[str, str]] = Counter()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            line = line.rstrip("\n")
            match = EVENT_LINE.search(line)
            if match and match["medium"]:
                self.blocks[(match["kind"], match["medium"])] += int(match["n"])
            self.lines.put(line)

    def drain(self, quiet_s: float = 0.6) -> list[str]:
        """The lines printed so far, once none came for quiet_s seconds."""
        lines = []
        while True:
            try:
                lines.append(self.lines.get(timeout=quiet_s))
            except queue.Empty:
                return lines

    def stop(self) -> None:
        """Interrupt the watcher (it prints its summary to its log) and wait for it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=5)
        self.stderr.close()


def server_config(args: argparse.Namespace, model: Path | str, disk: Path) -> VLLMServerConfig:
    """The vLLM server: LLMDConnector with host + disk tiers, KV events with replay."""
    extra = {
        "host_offload_bytes": args.host_offload_mib << 20,
        "disk_offload_path": str(disk),
        "disk_offload_bytes": args.disk_offload_mib << 20,
        "debug_state_path": str(LOG_DIR / "tiers.json"),
    }
    return VLLMServerConfig(
        model=Path(model),
        port=args.port,
        served_model_name="llmd-offload",
        dtype=args.dtype or ("auto" if args.model else "float32"),
        cpu_cores=args.cpu_cores,
        kv_cache_bytes=None if args.model else args.device_cache_mib << 20,
        max_model_len=args.max_model_len or (4096 if args.model else 1536),
        kv_transfer_config={
            "kv_connector": "LLMDConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": extra,
        },
        kv_events_config={
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "topic": "kv",
            "endpoint": f"tcp://*:{args.events_port or free_port()}",
            "replay_endpoint": f"tcp://*:{free_port()}",
        },
        extra_args=list(args.vllm_arg),
    )


def requests_plan(num_prefixes: int, prefix_words: int) -> list[tuple[int, list[dict]]]:
    """(prefix index, messages) per request: every prefix once, then again in reverse order."""
    prefixes = [
        {"role": "system", "content": sample_text(prefix_words, seed=100 + i)}
        for i in range(num_prefixes)
    ]
    order = list(range(num_prefixes)) + list(reversed(range(num_prefixes)))
    plan = []
    for n, i in enumerate(order):
        question = f"Question {n + 1}: what does rule {n + 1} of this handbook say?"
        plan.append((i, [prefixes[i], {"role": "user", "content": question}]))
    return plan


def chat(url: str, messages: list[dict], max_tokens: int) -> dict:
    """One greedy chat completion."""
    body = {"model": "llmd-offload", "messages": messages, "max_tokens": max_tokens}
    body["temperature"] = 0
    request = urllib.request.Request(
        url + "/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def token_sources(url: str) -> dict[str, float]:
    """vLLM's prompt tokens by source, cumulative."""
    samples = scrape_metrics(url)
    return {s: metric_sum(samples, "vllm:prompt_tokens_by_source_total", source=s) for s in SOURCES}


def connector_counters(url: str) -> dict[str, float]:
    """LLMDConnector's offload counters, cumulative."""
    samples = scrape_metrics(url)
    return {c: metric_sum(samples, f"llmd:offload_{c}_chunks_total") for c in COUNTERS}


def print_summary(server: VLLMServer, watcher: Watcher) -> None:
    """Per-tier event counts, the connector's counters and what each tier holds now."""
    print("\nKV events per tier (blocks):")
    for medium, tier in TIER_NAMES.items():
        stored = watcher.blocks[("BlockStored", medium)]
        removed = watcher.blocks[("BlockRemoved", medium)]
        print(f"  {medium:8} {tier:7} BlockStored {stored:4}  BlockRemoved {removed:4}")
    counters = connector_counters(server.url)
    print("LLMDConnector counters: " + ", ".join(f"{k} {int(v)}" for k, v in counters.items()))
    state_path = LOG_DIR / "tiers.json"
    if state_path.exists():
        state = json.loads(state_path.read_text())
        held = ", ".join(f"{tier} {len(hashes)}" for tier, hashes in state.items())
        print(f"tiers hold now (blocks, {state_path}): {held}")


def tally(lines: list[str]) -> str:
    """`GPU +6 -2 | CPU +6 | STORAGE -1`: blocks stored (+) and removed (-) per medium."""
    counts: Counter[tuple[str, str]] = Counter()
    for line in lines:
        match = EVENT_LINE.search(line)
        if match and match["medium"]:
            counts[(match["kind"], match["medium"])] += int(match["n"])
    parts = []
    for medium in TIER_NAMES:
        stored, removed = counts[("BlockStored", medium)], counts[("BlockRemoved", medium)]
        if stored or removed:
            parts.append(f"{medium} " + " ".join(f"{c:+d}" for c in (stored, -removed) if c))
    cleared = sum(1 for line in lines if "AllBlocksCleared" in line)
    return " | ".join(parts + (["AllBlocksCleared"] * bool(cleared))) or "none"


def run_requests(args: argparse.Namespace, server: VLLMServer, watcher: Watcher) -> None:
    """Send the plan; after each request print its token sources and the events it caused."""
    with open(LOG_DIR / "events.log", "w") as log:

        def show_events(lines: list[str]) -> None:
            log.writelines(line + "\n" for line in lines)
            print(f"    events (blocks): {tally(lines)}")
            for line in lines if args.verbose else ():
                print(f"      {line}")

        show_events(watcher.drain())  # anything published before the first request
        plan = requests_plan(args.prefixes, args.prefix_words)
        for n, (prefix, messages) in enumerate(plan, 1):
            before = token_sources(server.url)
            answer = chat(server.url, messages, args.max_tokens)
            time.sleep(0.3)  # the server's metrics catch up
            moved = {k: int(v - before[k]) for k, v in token_sources(server.url).items()}
            print(
                f"request {n:2}/{len(plan)} (prefix {prefix}): "
                f"{answer['usage']['prompt_tokens']} prompt tokens: "
                f"{moved['local_cache_hit']:4} from the device cache, "
                f"{moved['external_kv_transfer']:4} loaded from the tiers, "
                f"{moved['local_compute']:4} computed"
            )
            show_events(watcher.drain())


def build_parser() -> argparse.ArgumentParser:
    """The example's command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--model", help="a real model (Hugging Face id or folder) instead of the local tiny one")
    add("--preset", default="tiny", choices=sorted(PRESETS), help="local model preset")
    add("--dtype", help="vLLM --dtype (default: float32 for the local model, else auto)")
    add("--cpu-cores", default="0", help="CPU build: cores for vLLM's threads (e.g. 0 or 0-3)")
    add("--port", type=int, default=0, help="vLLM HTTP port (default: a free one)")
    add("--events-port", type=int, default=0, help="KV-event PUB port (default: a free one)")
    add(
        "--max-model-len",
        type=int,
        help="vLLM --max-model-len (default: 1536 for the local model, else 4096)",
    )
    add(
        "--device-cache-mib",
        type=int,
        default=4,
        help="local model only: device KV cache (default 4: 16 tiny blocks, so it evicts)",
    )
    add("--host-offload-mib", type=int, default=4, help="host tier (default 4: 16 tiny blocks)")
    add("--disk-offload-mib", type=int, default=4, help="disk tier (default 4: 16 tiny blocks)")
    add(
        "--disk-offload-path",
        type=Path,
        default=None,
        help=f"disk tier folder (default: {DEFAULT_DISK.relative_to(REPO_ROOT)}, emptied at "
        "start unless --keep-disk; a folder given here is never emptied)",
    )
    add("--keep-disk", action="store_true", help="warm restart: keep the default disk folder")
    add("--prefixes", type=int, default=6, help="distinct system prompts (default 6)")
    add("--prefix-words", type=int, default=440, help="words per system prompt (~6 tiny blocks)")
    add("--max-tokens", type=int, default=8, help="tokens generated per request")
    add("--verbose", action="store_true", help="print every event line, not only the tallies")
    add(
        "--vllm-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra vLLM argument, repeatable (e.g. --vllm-arg=--gpu-memory-utilization=0.5)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the example; 0 on success."""
    args = build_parser().parse_args(argv)
    if args.model:
        model: Path | str = args.model
    else:
        model = cached_model(args.preset, REPO_ROOT / ".cache" / "models")
    disk = args.disk_offload_path or DEFAULT_DISK
    if args.disk_offload_path is None and not args.keep_disk:
        shutil.rmtree(DEFAULT_DISK, ignore_errors=True)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    (LOG_DIR / "tiers.json").unlink(missing_ok=True)
    server = VLLMServer(server_config(args, model, disk), LOG_DIR / "vllm.log")
    events = server.config.kv_events_config
    assert events is not None
    endpoint = events["endpoint"].replace("*", "127.0.0.1")
    replay = events["replay_endpoint"].replace("*", "127.0.0.1")
    print(f"starting vLLM with LLMDConnector host + disk tiers (log {server.log_path}) ...")
    started = time.monotonic()
    watcher = None
    try:
        server.start().wait_ready(timeout=600)
        print(f"ready after {time.monotonic() - started:.0f}s: {server.url}, events {endpoint}")
        print(f"watching: python -m vllm_llmd.events watch {endpoint} --replay {replay}\n")
        watcher = Watcher(endpoint, replay, LOG_DIR / "watcher.log")
        run_requests(args, server, watcher)
        print_summary(server, watcher)
    except (urllib.error.URLError, ConnectionError) as exc:
        # The engine died or refused: show why from its log instead of a client traceback.
        print(f"\nrequest failed: {exc}; the last errors in {server.log_path}:", file=sys.stderr)
        errors = [line for line in server.log_text().splitlines() if " ERROR " in line]
        print("\n".join(errors[-12:]) or server.log_tail(20), file=sys.stderr)
        return 1
    finally:
        if watcher is not None:
            watcher.stop()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
