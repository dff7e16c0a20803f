"""The chaos run (issue #22): the single-box stack at its fullest, under steady load, while its
processes die and come back. Real processes throughout; bounded in time; stops by itself.

The stack (tiny model, float32, greedy: outputs are exact):

- Redis: LMCache's shared L2, and the router's block index (`--redis-url`);
- an `lmcache server` (the shared tier);
- a prefill vLLM (kv_producer) and a decode vLLM (kv_consumer with a small device cache, host
  and disk tiers and the shared tier), both publishing KV events;
- `vllm-llmd-router` in front (P/D for long uncached prompts, `--tokenizer`), reading the
  decode pod's live events through a TCP relay this script can cut (its replay socket direct).

First a plain vLLM computes every prompt's output (then stops). Then `--clients` threads send
requests through the router back to back for `--duration` seconds; a request that fails is
tried again after a short pause for up to `--retry-s` seconds, as a client would, and counts as
lost only if no try succeeded. Meanwhile, in order: kill -9 of the prefill pod and its start
again; a restart of the decode pod at the same address; kill -9 of the LMCache server, then of
Redis, each started again (empty) a few seconds later; the decode pod's event stream cut for a
few seconds.

It prints: requests sent, answered, lost, every failed try by cause, outputs that differ from
plain vLLM's; the leak gauges of each pod at the end (`llmd:pd_held_blocks`,
`llmd:offload_busy_chunks`); and after each fault, how long until the router's index (read
from Redis) agreed again with a fresh subscriber's view of the pods (this script's own
`EventIngestor`, following both pods directly) on every prompt's blocks.

Usage: `.venv/bin/python benchmarks/chaos.py [--duration 150] [--clients 2]` (about 5 minutes
with start-up). Logs: logs/chaos/.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from vllm_llmd.devtools.client import (
    HTTPStatusError,
    complete,
    completion_token_ids,
    metric_sum,
    scrape_metrics,
)
from vllm_llmd.devtools.model_maker import cached_model, sample_text
from vllm_llmd.devtools.redis_server import RedisServer
from vllm_llmd.devtools.server import (
    VLLMServer,
    VLLMServerConfig,
    event_endpoints,
    free_port,
    kv_events_config,
    llmd_connector,
    wait_for_health,
)
from vllm_llmd.hashing import PrefixHasher
from vllm_llmd.router.index import InMemoryIndex
from vllm_llmd.router.ingest import EventIngestor
from vllm_llmd.router.redis_index import RedisIndex
from vllm_llmd.shared_tier.lmcache_server import LMCacheServer, LMCacheServerConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
LOG_DIR = REPO_ROOT / "logs" / "chaos"
BLOCK = 128  # vLLM's block size on CPU
MAX_TOKENS = 8
LEASE_S = 5.0
# a vLLM start under load on 2 cores takes minutes
RESTART_TIMEOUT_S = 600.0


# ---- the relay that cuts the decode pod's event stream -------------------------------------


class TcpRelay:
    """Forwards 127.0.0.1:port to a target; `cut(s)` drops every connection and refuses new
    ones for s seconds (the peer sees its connection reset, as on a network fault)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._refuse_until = 0.0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if time.monotonic() < self._refuse_until:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self, seconds: float) -> None:
        self._refuse_until = time.monotonic() + seconds
        with self._lock:
            dropped, self._open = self._open, []
        for sock in dropped:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


# ---- the stack -----------------------------------------------------------------------------


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


@dataclass
class Stack:
    redis: RedisServer
    lmcache: LMCacheServer
    prefill: VLLMServer
    decode: VLLMServer
    relay: TcpRelay
    router: subprocess.Popen[bytes]
    router_url: str

    def stop(self) -> None:
        self.router.terminate()
        try:
            self.router.wait(10)
        except subprocess.TimeoutExpired:
            self.router.kill()
        for server in (self.prefill, self.decode):
            server.stop()
        self.lmcache.cleanup()
        self.redis.stop()


def start_stack(model: Path, folder: Path) -> Stack:
    """Every process of the stack, started and ready; what started is stopped if one fails."""
    with contextlib.ExitStack() as started:
        redis = RedisServer(folder)
        started.callback(redis.stop)
        redis.wait_ready()
        lmcache = LMCacheServer(
            LMCacheServerConfig("chaos", redis_url=redis.url), LOG_DIR / "lmcache.log"
        ).start()
        started.callback(lmcache.cleanup)
        lmcache.wait_ready()
        prefill = VLLMServer(
            VLLMServerConfig(
                model=model,
                cpu_cores="0",
                max_model_len=1024,
                kv_transfer_config=llmd_connector("kv_producer", {"lease_s": LEASE_S}),
                kv_events_config=kv_events_config(),
            ),
            LOG_DIR / "prefill.log",
        )
        decode = VLLMServer(
            VLLMServerConfig(
                model=model,
                cpu_cores="1",
                max_model_len=1024,
                kv_cache_bytes=6 << 20,  # 24 blocks: prompts leave it for the tiers below
                kv_transfer_config=llmd_connector(
                    "kv_consumer",
                    {
                        "host_offload_bytes": "4MiB",
                        "disk_offload_path": str(folder / "disk"),
                        "disk_offload_bytes": "64MiB",
                        "shared_tier_url": lmcache.url,
                        "shared_tier_timeout_s": 2.0,
                        "shared_tier_retry_s": 1.0,
                        "transfer_timeout_s": 5.0,
                    },
                    kv_load_failure_policy="recompute",
                ),
                kv_events_config=kv_events_config(),
                env={"LMCACHE_DISABLE_BANNER": "1", "LMCACHE_TRACK_USAGE": "false"},
            ),
            LOG_DIR / "decode.log",
        )
        for server in (prefill, decode):
            server.start()
            started.callback(server.stop)
        for server in (prefill, decode):
            server.wait_ready()
        decode_events, decode_replay = event_endpoints(decode.config)
        relay = TcpRelay(_port(decode_events))
        port = free_port()
        decode_spec = (
            f"{decode.url},role=decode,events=tcp://127.0.0.1:{relay.port},replay={decode_replay}"
        )
        argv = [sys.executable, "-m", "vllm_llmd.router.cli", "--port", str(port)]
        argv += ["--pod", f"{prefill.url},role=prefill", "--pod", decode_spec]
        argv += [
            "--tokenizer",
            str(model),
            "--redis-url",
            redis.url,
            "--pd-threshold-tokens",
            "200",
        ]
        argv += ["--poll-interval-s", "0.5", "--audit-log", str(LOG_DIR / "audit.jsonl")]
        with open(LOG_DIR / "router.log", "wb") as log:
            router = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        started.callback(router.kill)
        url = f"http://127.0.0.1:{port}"
        if not wait_for_health(url, router, 60, poll_s=0.3):
            raise RuntimeError(f"the router did not start: see {LOG_DIR / 'router.log'}")
        started.pop_all()  # all up: Stack.stop ends them
        return Stack(redis, lmcache, prefill, decode, relay, router, url)


# ---- load --------------------------------------------------------------------------------


@dataclass
class Tally:
    sent: int = 0
    answered: int = 0
    lost: int = 0
    wrong: int = 0
    failed_tries: collections.Counter[str] = field(default_factory=collections.Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _cause(exc: Exception) -> str:
    if isinstance(exc, HTTPStatusError):
        return f"HTTP {exc.status}"
    return type(exc).__name__


def client_loop(
    router_url: str,
    model: str,
    prompts: list[list[int]],
    expected: list[list[int]],
    stop: threading.Event,
    tally: Tally,
    retry_s: float,
    think_s: float,
    seed: int,
) -> None:
    rng = random.Random(seed)
    while not stop.wait(think_s):
        i = rng.randrange(len(prompts))
        with tally.lock:
            tally.sent += 1
        deadline = time.monotonic() + retry_s
        while True:
            try:
                answer = complete(router_url, model, prompts[i], max_tokens=MAX_TOKENS)
            except Exception as exc:
                with tally.lock:
                    tally.failed_tries[_cause(exc)] += 1
                if time.monotonic() > deadline:
                    with tally.lock:
                        tally.lost += 1
                    break
                time.sleep(0.5)
                continue
            with tally.lock:
                tally.answered += 1
                tally.wrong += completion_token_ids(answer) != expected[i]
            break


# ---- the index check ---------------------------------------------------------------------


class IndexCheck:
    """Does the router's index (in Redis) agree with a fresh subscriber's view of the pods?"""

    def __init__(self, stack: Stack, hashes: list[list[int]]) -> None:
        self.hashes = hashes
        self.redis_url = stack.redis.url
        self.truth = EventIngestor(InMemoryIndex())
        for server in (stack.prefill, stack.decode):
            self.truth.add_pod(server.url, *event_endpoints(server.config), "kv")
        self._router_index: RedisIndex | None = None

    def _router(self) -> RedisIndex:
        if self._router_index is None:
            self._router_index = RedisIndex(self.redis_url, socket_timeout_s=1.0)
        return self._router_index

    def agrees(self) -> bool:
        try:
            router = self._router()
            for hashes in self.hashes:
                mine = {p: h.num_blocks for p, h in self.truth.index.lookup_prefix(hashes).items()}
                theirs = {p: h.num_blocks for p, h in router.lookup_prefix(hashes).items()}
                if mine != theirs:
                    return False
        except Exception:
            self._router_index = None
            return False
        return True

    def seconds_until_agreement(self, timeout: float = 30.0) -> float | None:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.agrees():
                return time.monotonic() - started
            time.sleep(0.05)
        return None


# ---- the faults --------------------------------------------------------------------------


def start_again(server: VLLMServer) -> None:
    """Start a stopped server and wait until it serves.

    A workaround for this 2-core box, not for the stack: vLLM CPU can start a restarted
    server's engine core pinned to the other server's core, where that server's worker spins
    at 100%, and the engine core then waits minutes for a slice. While it starts, every process
    of the server but its worker (whose pinning is vLLM's own OMP binding) may run on any core.
    """
    server.start()
    assert server.process is not None
    group, everywhere = server.process.pid, set(range(os.cpu_count() or 1))
    done = threading.Event()

    def unpin() -> None:
        while not done.wait(0.5):
            for pid in _group_members(group):
                with contextlib.suppress(OSError):
                    if "VLLM::Worker" not in Path(f"/proc/{pid}/cmdline").read_text():
                        os.sched_setaffinity(pid, everywhere)

    threading.Thread(target=unpin, daemon=True).start()
    try:
        server.wait_ready(RESTART_TIMEOUT_S)
    finally:
        done.set()


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                # field 5 of /proc/PID/stat, after the parenthesised name
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid:
                    members.append(int(entry.name))
    return members


def run_faults(stack: Stack, check: IndexCheck, log: Callable[[str], None]) -> dict[str, str]:
    """Each fault in turn; {fault: index recovery} (seconds after the fault ended)."""
    recovery: dict[str, str] = {}

    def measure(name: str) -> None:
        seconds = check.seconds_until_agreement()
        recovery[name] = "never (30 s)" if seconds is None else f"{seconds:.2f} s"
        log(f"{name}: index agreed again after {recovery[name]}")

    time.sleep(10)
    log("kill -9 prefill")
    stack.prefill.kill()
    time.sleep(5)
    start_again(stack.prefill)
    log("prefill back")
    measure("prefill killed and started again")

    time.sleep(10)
    log("restart decode")
    stack.decode.stop()
    start_again(stack.decode)
    log("decode back")
    measure("decode restarted")

    time.sleep(10)
    log("kill -9 LMCache server")
    stack.lmcache.kill()
    time.sleep(5)
    stack.lmcache.start().wait_ready()
    log("LMCache server back")

    time.sleep(10)
    log("kill -9 Redis")
    stack.redis.kill()
    time.sleep(3)
    stack.redis.restart()
    log("Redis back (empty)")
    measure("Redis killed and started again (empty)")

    time.sleep(10)
    log("cut the decode pod's event stream for 3 s")
    stack.relay.cut(3.0)
    time.sleep(3.0)
    measure("events dropped for 3 s")
    return recovery


def leak_gauges(server: VLLMServer) -> dict[str, float]:
    # a step makes each half report its gauges (they are sent when they change, at steps)
    complete(server.url, server.model_name, [1, 2, 3], max_tokens=1)
    samples = scrape_metrics(server.url)
    return {
        name: metric_sum(samples, name)
        for name in ("llmd:pd_held_blocks", "llmd:offload_busy_chunks")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=150.0, help="seconds of load")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--retry-s", type=float, default=120.0)
    parser.add_argument(
        "--think-s", type=float, default=0.3, help="each client's pause between requests"
    )
    parser.add_argument("--shared-prompts", type=int, default=16)
    parser.add_argument("--unique-prompts", type=int, default=48)
    args = parser.parse_args()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    (LOG_DIR / "audit.jsonl").unlink(missing_ok=True)  # this run's decisions only
    started = time.monotonic()

    def log(text: str) -> None:
        print(f"[{time.monotonic() - started:7.1f} s] {text}", flush=True)

    model = cached_model("tiny", REPO_ROOT / ".cache" / "models")
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    documents = [sample_text(260, seed=4000 + d) for d in range(4)]
    texts = [
        documents[i % 4] + " " + sample_text(30, seed=5000 + i) for i in range(args.shared_prompts)
    ]
    texts += [sample_text(330, seed=6000 + i) for i in range(args.unique_prompts)]
    prompts = [tokenizer.encode(text).ids[:600] for text in texts]

    log(f"reference outputs of {len(prompts)} prompts from plain vLLM")
    with VLLMServer(
        VLLMServerConfig(model=model, cpu_cores="0", max_model_len=1024),
        LOG_DIR / "reference.log",
    ) as reference:
        expected = [
            completion_token_ids(complete(reference.url, reference.model_name, p, MAX_TOKENS))
            for p in prompts
        ]

    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        log("starting Redis, LMCache, prefill, decode, router")
        stack = start_stack(model, Path(tmp))
        check = IndexCheck(stack, [PrefixHasher(BLOCK).event_hashes(p) for p in prompts])
        tally = Tally()
        stop = threading.Event()
        clients = [
            threading.Thread(
                target=client_loop,
                args=(
                    stack.router_url,
                    stack.decode.model_name,
                    prompts,
                    expected,
                    stop,
                    tally,
                    args.retry_s,
                    args.think_s,
                    seed,
                ),
                daemon=True,
            )
            for seed in range(args.clients)
        ]
        try:
            log(f"load: {args.clients} clients for {args.duration:.0f} s, faults meanwhile")
            load_started = time.monotonic()
            for client in clients:
                client.start()
            try:
                recovery = run_faults(stack, check, log)
            except Exception as exc:  # report what ran, then say what failed
                log(f"a fault step failed: {exc!r}"[:2000])
                recovery = {"(the fault sequence failed)": repr(exc)[:200]}
            time.sleep(max(0.0, args.duration - (time.monotonic() - load_started)))
            stop.set()
            for client in clients:
                client.join(args.retry_s + 30)
            log("load over; waiting out the leases before reading the leak gauges")
            time.sleep(LEASE_S + 2)
            gauges = {
                name: leak_gauges(server)
                for name, server in (("prefill", stack.prefill), ("decode", stack.decode))
            }
            router_samples = scrape_metrics(stack.router_url)
        finally:
            stop.set()
            check.truth.close()
            stack.stop()

    print()
    print(f"requests sent      {tally.sent}")
    print(f"answered           {tally.answered}")
    print(f"lost (no try ok)   {tally.lost}")
    print(f"wrong outputs      {tally.wrong} (against plain vLLM, greedy, float32)")
    causes = ", ".join(f"{c}: {n}" for c, n in tally.failed_tries.most_common())
    print(f"failed tries       {causes or 'none'}")
    print(f"router event gaps  {metric_sum(router_samples, 'llmd:router_event_gaps_total'):.0f}")
    for pod, values in gauges.items():
        print(f"{pod:<8} at the end  " + ", ".join(f"{k} = {v:.0f}" for k, v in values.items()))
    print("index agreement after each fault (goal: within 1 s):")
    for fault, seconds in recovery.items():
        print(f"  {fault:<42} {seconds}")


if __name__ == "__main__":
    main()
