"""`python -m vllm_llmd.events watch ENDPOINT`: print a vLLM engine's KV events as they come.

The tool to reach for when a router "does not see" a cache: it shows whether the engine
publishes at all, on which topic, for which tier, and which hashes. One line per event:

    seq=12 BlockStored medium=GPU blocks=3 first_hash=3262291359910021016 parent=None ...
    seq=13 BlockRemoved medium=GPU blocks=1 first_hash=7142137847444424233
    RESET seq=0 (the engine restarted)
    GAP seq=5..9 lost

With --replay it first prints what the engine's replay buffer still holds (marked `replayed`).
`--transport zmtp` reads through our bounded ZMTP client instead of pyzmq (see transport.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TextIO

import zmq

from vllm_llmd.events.model import AllBlocksCleared, BlockRemoved, BlockStored, Event
from vllm_llmd.events.subscriber import Subscriber
from vllm_llmd.events.transport import TRANSPORTS
from vllm_llmd.events.updates import Gap, ReceivedBatch, Reset, Update


def format_event(seq: int, event: Event, replayed: bool = False) -> str:
    """One line for one event (see the module docstring)."""
    tail = " replayed" if replayed else ""
    if isinstance(event, AllBlocksCleared):
        return f"seq={seq} AllBlocksCleared{tail}"
    first = event.block_hashes[0] if event.block_hashes else None
    line = (
        f"seq={seq} {type(event).__name__} medium={event.medium} "
        f"blocks={len(event.block_hashes)} first_hash={first}"
    )
    if isinstance(event, BlockStored):
        line += (
            f" parent={event.parent_block_hash} block_size={event.block_size} "
            f"tokens={len(event.token_ids)} group={event.group_idx}"
        )
        if event.lora_name:
            line += f" lora={event.lora_name}"
    elif isinstance(event, BlockRemoved):
        line += f" group={event.group_idx}"
    return line + tail


def format_update(update: Update) -> list[str]:
    """The lines for one subscriber update."""
    if isinstance(update, Reset):
        return [f"RESET seq={update.seq} (the engine restarted; forget its blocks)"]
    if isinstance(update, Gap):
        return [f"GAP seq={update.first_seq}..{update.last_seq} lost"]
    assert isinstance(update, ReceivedBatch)
    lines = [format_event(update.seq, event, update.replayed) for event in update.batch.events]
    if update.batch.num_malformed or update.batch.num_unknown:
        lines.append(
            f"seq={update.seq} skipped malformed={update.batch.num_malformed} "
            f"unknown={update.batch.num_unknown}"
        )
    return lines


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

    Exit status 1 when no event came at all (said on stderr, with what to check)."""
    out = out or sys.stdout
    subscriber = Subscriber(
        args.endpoint,
        replay_endpoint=args.replay,
        topic=args.topic,
        replay_timeout=args.replay_timeout,
        transport=args.transport,
    )
    print(
        f"watching {args.endpoint} topic={args.topic!r} replay={args.replay} "
        f"transport={args.transport}",
        file=sys.stderr,
        flush=True,
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
                print(
                    silence_warning(subscriber, args.endpoint, args.silence_warning_s),
                    file=sys.stderr,
                    flush=True,
                )
                warned = True
    except KeyboardInterrupt:
        pass
    finally:
        if not heard and not warned:
            silent_s = round(time.monotonic() - started, 1)
            print(silence_warning(subscriber, args.endpoint, silent_s), file=sys.stderr)
        subscriber.close()
        print(f"summary: {subscriber.stats}", file=sys.stderr, flush=True)
    return 0 if heard else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_llmd.events", description="Tools for vLLM's KV-event stream."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    w = commands.add_parser(
        "watch",
        help="print one line per KV event of one engine",
        description="Print one line per KV event (seq, type, medium, blocks, first hash).",
    )
    w.add_argument(
        "endpoint",
        help="the engine's event endpoint to connect to, e.g. tcp://127.0.0.1:5557 "
        "(vLLM's --kv-events-config endpoint, with * replaced by its host)",
    )
    w.add_argument("--replay", metavar="ENDPOINT", help="the engine's replay endpoint")
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
    w.set_defaults(run=watch)
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    # a bad endpoint and the like: say what to fix, without a traceback
    except (ValueError, zmq.ZMQError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
