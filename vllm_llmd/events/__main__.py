"""`vllm-llmd-events watch ENDPOINT | --pod URL`: print a vLLM engine's KV events as they come.

(Also `python -m vllm_llmd.events watch ...`.) The tool to reach for when a router "does not
see" a cache: it shows whether the engine publishes at all, on which topic, for which tier, and
which hashes. One line per event, stamped with this machine's clock and the batch's own `ts`
(the engine's clock when it took the events), both ISO 8601 with milliseconds:

    2026-05-04T10:00:01.234+00:00 batch_ts=2026-05-04T10:00:01.230+00:00 seq=12 BlockStored \
        medium=GPU blocks=3 first_hash=02258717921a4881 parent=None block_size=16 tokens=48 ...
    2026-05-04T10:00:01.240+00:00 batch_ts=2026-05-04T10:00:01.236+00:00 seq=13 BlockRemoved \
        medium=GPU blocks=1 first_hash=6a0d3c9b7e21f405 group=None
    2026-05-04T10:00:02.001+00:00 RESET seq=0 (the engine restarted; forget its blocks)
    2026-05-04T10:00:02.001+00:00 GAP seq=5..9 lost

Hashes are spelled by `vllm_llmd.hashing.short_hash`: the event int in 16 hex digits, the tail
of the full hex the debug state file and the logs print (grep one for the other).

`--pod URL` asks the pod (its vLLM HTTP server) for its endpoints, as the router does (`GET
/kv_event_sources`, DP rank 0) instead of taking ENDPOINT and --replay. With --replay it first
prints what the engine's replay buffer still holds (marked `replayed`). `--transport zmtp` reads
through our bounded ZMTP client instead of pyzmq (see transport.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from datetime import datetime
from typing import TextIO

import aiohttp
import zmq

from vllm_llmd.events.curve import CurveClientKeys
from vllm_llmd.events.model import AllBlocksCleared, BlockRemoved, BlockStored, Event
from vllm_llmd.events.sources import BadEventSources, NoEventSources, event_endpoints
from vllm_llmd.events.subscriber import Subscriber
from vllm_llmd.events.transport import TRANSPORTS
from vllm_llmd.events.updates import Gap, ReceivedBatch, Reset, Update
from vllm_llmd.hashing import short_hash


class WatchError(Exception):
    """The watcher cannot start; the message says why and what to check."""


def timestamp(ts: float) -> str:
    """A wall-clock time (time.time()) in local ISO 8601 with milliseconds and the offset."""
    try:
        return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="milliseconds")
    except (OverflowError, OSError, ValueError):  # a publisher's clock is not ours to trust
        return repr(ts)


def _spell(block_hash: int | None) -> str:
    return "None" if block_hash is None else short_hash(block_hash)


def format_event(seq: int, event: Event, replayed: bool = False) -> str:
    """One line for one event, without its timestamps (see the module docstring)."""
    tail = " replayed" if replayed else ""
    if isinstance(event, AllBlocksCleared):
        return f"seq={seq} AllBlocksCleared{tail}"
    first = event.block_hashes[0] if event.block_hashes else None
    line = (
        f"seq={seq} {type(event).__name__} medium={event.medium} "
        f"blocks={len(event.block_hashes)} first_hash={_spell(first)}"
    )
    if isinstance(event, BlockStored):
        line += (
            f" parent={_spell(event.parent_block_hash)} block_size={event.block_size} "
            f"tokens={len(event.token_ids)} group={event.group_idx}"
        )
        if event.lora_name:
            line += f" lora={event.lora_name}"
    elif isinstance(event, BlockRemoved):
        line += f" group={event.group_idx}"
    return line + tail


def format_update(update: Update, now: float | None = None) -> list[str]:
    """The lines for one subscriber update, each stamped with `now` (default: the clock's
    time) and, for a batch's lines, the batch's own ts."""
    wall = timestamp(time.time() if now is None else now)
    if isinstance(update, Reset):
        return [f"{wall} RESET seq={update.seq} (the engine restarted; forget its blocks)"]
    if isinstance(update, Gap):
        return [f"{wall} GAP seq={update.first_seq}..{update.last_seq} lost"]
    assert isinstance(update, ReceivedBatch)
    batch = update.batch
    lines = [format_event(update.seq, event, update.replayed) for event in batch.events]
    if batch.num_malformed or batch.num_unknown:
        lines.append(
            f"seq={update.seq} skipped malformed={batch.num_malformed} unknown={batch.num_unknown}"
        )
    stamps = f"{wall} batch_ts={timestamp(batch.ts)}"
    return [f"{stamps} {line}" for line in lines]


def _stderr(message: str) -> None:
    print(f"{timestamp(time.time())} {message}", file=sys.stderr, flush=True)


def pod_endpoints(url: str) -> tuple[str, str | None]:
    """A pod's (event, replay) endpoints from its GET /kv_event_sources, as the router asks.

    Raises:
        WatchError: the pod cannot be asked, or names no event endpoint; the message says why.
    """
    url = url.rstrip("/")
    if "://" not in url:
        url = "http://" + url

    async def ask() -> tuple[str | None, str | None]:
        async with aiohttp.ClientSession() as session:
            return await event_endpoints(session, url)

    try:
        endpoint, replay = asyncio.run(ask())
    except NoEventSources as exc:
        raise WatchError(
            f"cannot find the KV-event endpoint of pod {url}: {exc}. Is the URL the pod's vLLM "
            "HTTP server, and its --kv-events-config on? (Or give ENDPOINT instead of --pod.)"
        ) from None
    except BadEventSources as exc:
        raise WatchError(f"pod {url} gave a bad answer: {exc}") from None
    if endpoint is None:
        raise WatchError(f"pod {url}: GET /kv_event_sources names no endpoint")
    return endpoint, replay


def silence_warning(subscriber: Subscriber, endpoint: str, seconds: float) -> str:
    """What to tell an operator whose watcher heard nothing for `seconds`."""
    if not subscriber.subscribed:
        return (
            f"no events in {seconds:g} s: nothing answers at {endpoint} (is vLLM's "
            "--kv-events-config publisher on, with this port, and is the host right?)"
        )
    return (
        f"no events in {seconds:g} s: connected to {endpoint}, but nothing was published "
        "(no request ran since, or --topic does not match the publisher's topic)"
    )


def watch(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run `watch` until interrupted or --duration ends; print a summary on stderr.

    Exit status 1 when no event came at all (said on stderr, with what to check).

    Raises:
        WatchError: --pod named a pod that gives no event endpoint.
    """
    out = out or sys.stdout
    if args.pod is not None:
        args.endpoint, replay = pod_endpoints(args.pod)
        args.replay = args.replay or replay
        _stderr(f"pod {args.pod}: events at {args.endpoint}, replay at {replay}")
    subscriber = Subscriber(
        args.endpoint,
        replay_endpoint=args.replay,
        topic=args.topic,
        replay_timeout=args.replay_timeout,
        transport=args.transport,
        curve=_curve_keys(args),
    )
    _stderr(
        f"watching {args.endpoint} topic={args.topic!r} replay={args.replay} "
        f"transport={args.transport}"
    )
    started = time.monotonic()
    deadline = None if args.duration is None else started + args.duration
    heard = warned = False
    try:
        while deadline is None or time.monotonic() < deadline:
            wait = 0.2 if deadline is None else min(0.2, max(0.0, deadline - time.monotonic()))
            for update in subscriber.poll(wait):
                heard = True
                for line in format_update(update):
                    print(line, file=out, flush=True)  # flush: an operator may pipe into grep
            silent_s = time.monotonic() - started
            if not heard and not warned and silent_s >= args.silence_warning_s:
                _stderr(silence_warning(subscriber, args.endpoint, args.silence_warning_s))
                warned = True
    except KeyboardInterrupt:
        pass
    finally:
        if not heard and not warned:
            silent_s = round(time.monotonic() - started, 1)
            _stderr(silence_warning(subscriber, args.endpoint, silent_s))
        subscriber.close()
        _stderr(f"summary: {subscriber.stats}")
    return 0 if heard else 1


def _prog() -> str:
    """`vllm-llmd-events` when run as the installed command, else the module's spelling."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name and name != "__main__.py" else "python -m vllm_llmd.events"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=_prog(), description="Tools for vLLM's KV-event stream.")
    commands = parser.add_subparsers(dest="command", required=True)
    w = commands.add_parser(
        "watch",
        help="print one line per KV event of one engine",
        description="Print one line per KV event (timestamps, seq, type, medium, blocks, first "
        "hash), from ENDPOINT or from the endpoints a pod names (--pod).",
    )
    w.add_argument(
        "endpoint",
        nargs="?",
        help="the engine's event endpoint to connect to, e.g. tcp://127.0.0.1:5557 "
        "(vLLM's --kv-events-config endpoint, with * replaced by its host); or give --pod",
    )
    w.add_argument(
        "--pod",
        metavar="URL",
        help="instead of ENDPOINT: a vLLM pod's HTTP URL (e.g. http://10.0.0.7:8000); its "
        "event and replay endpoints come from its GET /kv_event_sources (DP rank 0), as the "
        "router finds them",
    )
    w.add_argument(
        "--replay",
        metavar="ENDPOINT",
        help="the engine's replay endpoint (with --pod: the pod's own, unless given)",
    )
    w.add_argument("--topic", default="", help="topic prefix to subscribe to (default: all)")
    w.add_argument(
        "--duration", type=float, metavar="SECONDS", help="stop after this long (default: never)"
    )
    w.add_argument(
        "--silence-warning-s",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="say on stderr, once, when nothing came for this long (default: 10); the exit "
        "status is 1 when nothing came at all",
    )
    w.add_argument(
        "--replay-timeout",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="how long to wait for each replayed batch (default: 2)",
    )
    w.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="zmq",
        help="zmq: pyzmq's sockets; zmtp: our ZMTP client, which also bounds a whole multipart "
        "message (default: zmq)",
    )
    w.add_argument(
        "--curve-key",
        metavar="FILE",
        help="read a CURVE-encrypted stream (vllm_llmd/events/curve.py): this reader's "
        "certificate (NAME.key_secret); with --curve-pod-key and the zmq transport",
    )
    w.add_argument(
        "--curve-pod-key", metavar="FILE", help="the pods' CURVE public certificate (NAME.key)"
    )
    w.set_defaults(run=watch)
    return parser


def _curve_keys(args: argparse.Namespace) -> CurveClientKeys | None:
    """The reader's CURVE keys from --curve-key and --curve-pod-key (ValueError: one alone,
    or a file that is not a usable certificate)."""
    if args.curve_key is None and args.curve_pod_key is None:
        return None
    if args.curve_key is None or args.curve_pod_key is None:
        raise ValueError("--curve-key and --curve-pod-key go together")
    return CurveClientKeys.load(args.curve_key, args.curve_pod_key)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "watch" and (args.endpoint is None) == (args.pod is None):
        parser.error("watch: give an ENDPOINT or --pod URL (one of them)")
    try:
        return int(args.run(args))
    # a bad endpoint, a pod without events and the like: say what to fix, without a traceback
    except (WatchError, ValueError, zmq.ZMQError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
