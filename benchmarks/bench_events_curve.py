"""What CURVE costs the KV-event streams: vLLM's own publisher, in clear and with CURVE, into the
router's `EventIngestor`, in one run.

A batch is one prompt's BlockStored (`--blocks` blocks of 16 tokens, token ids included, as
vLLM publishes them). Each run publishes `--batches` batches as fast as the publisher takes
them and times until the ingestor has applied the last; throughput in blocks per second, and
the ratio of each run to the clear run with the same transport. Runs: clear through our ZMTP
client (the router's default), clear through pyzmq, CURVE through pyzmq (what
`--kv-events-curve-key` uses).

Usage: `.venv/bin/python benchmarks/bench_events_curve.py [--batches 2000] [--blocks 32]`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import zmq.auth
from vllm.distributed import kv_events as vllm_events

from vllm_llmd.connector.curve_publisher import make_publisher
from vllm_llmd.devtools.server import free_port
from vllm_llmd.events.curve import CLIENTS_ENV, SECRET_KEY_ENV, CurveClientKeys
from vllm_llmd.router.index import InMemoryIndex
from vllm_llmd.router.ingest import EventIngestor

BLOCK = 16


def _batch(i: int, blocks: int) -> vllm_events.KVEventBatch:
    hashes = [(i << 20) + b for b in range(blocks)]
    stored = vllm_events.BlockStored(
        block_hashes=hashes,
        parent_block_hash=None,
        token_ids=list(range(BLOCK * blocks)),
        block_size=BLOCK,
        lora_id=None,
        medium="GPU",
        lora_name=None,
    )
    return vllm_events.KVEventBatch(ts=time.time(), events=[stored])


def run(
    batches: int, blocks: int, transport: str, curve: CurveClientKeys | None, env: dict[str, str]
) -> float:
    """Seconds from the first publish to the last batch applied."""
    saved = {name: os.environ.pop(name, None) for name in (SECRET_KEY_ENV, CLIENTS_ENV)}
    os.environ.update(env)
    try:
        port, replay = free_port(), free_port()
        publisher = make_publisher(
            data_parallel_rank=0,
            endpoint=f"tcp://*:{port}",
            replay_endpoint=f"tcp://*:{replay}",
            topic="kv",
            buffer_steps=batches + 10,
        )
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value
    ingestor = EventIngestor(
        InMemoryIndex(max_entries=batches * blocks + 1), transport=transport, curve=curve
    )
    try:
        ingestor.add_pod("pod", f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{replay}", "kv")
        # one batch first: the subscription is up before the clock starts
        publisher.publish(_batch(0, blocks))
        while ingestor.stats()["pod"]["num_batches"] < 1:
            time.sleep(0.01)
        prepared = [_batch(i, blocks) for i in range(1, batches + 1)]
        started = time.perf_counter()
        for batch in prepared:
            publisher.publish(batch)
        deadline = time.monotonic() + 300
        while ingestor.stats()["pod"]["num_batches"] < batches + 1:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{transport}: not all batches arrived")
            time.sleep(0.002)
        elapsed = time.perf_counter() - started
        stats = ingestor.stats()["pod"]
        assert stats["num_gaps"] == 0, stats
        return elapsed
    finally:
        ingestor.close()
        publisher.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each; the best is kept")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "readers").mkdir()
        for name in ("pods", "router"):
            zmq.auth.create_certificates(root, name)
        (root / "readers" / "router.key").write_bytes((root / "router.key").read_bytes())
        curve = CurveClientKeys.load(root / "router.key_secret", root / "pods.key")
        curve_env = {
            SECRET_KEY_ENV: str(root / "pods.key_secret"),
            CLIENTS_ENV: str(root / "readers"),
        }
        runs = {
            "clear, zmtp (default)": ("zmtp", None, {}),
            "clear, zmq": ("zmq", None, {}),
            "CURVE, zmq": ("zmq", curve, curve_env),
        }
        results = {}
        for name, (transport, keys, env) in runs.items():
            results[name] = min(
                run(args.batches, args.blocks, transport, keys, env) for _ in range(args.repeats)
            )
    blocks = args.batches * args.blocks
    print(f"{args.batches} batches x {args.blocks} blocks, best of {args.repeats}")
    print(f"{'run':<24}{'seconds':>10}{'blocks/s':>12}{'vs clear zmq':>14}")
    for name, seconds in results.items():
        ratio = seconds / results["clear, zmq"]
        print(f"{name:<24}{seconds:>10.3f}{blocks / seconds:>12,.0f}{ratio:>13.2f}x")


if __name__ == "__main__":
    main()
