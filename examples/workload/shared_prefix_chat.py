"""Replay a shared-prefix chat workload against any OpenAI-compatible endpoint; print latencies.

N conversations share a few long system prompts (conversation i uses prompt i mod S); each runs
several turns, every turn appending the previous answer and a new user message, so each request
repeats a long prefix that a prefix-aware stack (vLLM's prefix cache, LLMDConnector's tiers, a
cache-aware router) need not recompute. At most C requests are in flight; with --request-rate,
requests also wait for the next arrival of a Poisson process. Every request is streamed.

Prints time to first token (TTFT), time per output token after the first (TPOT) and end-to-end
latency (p50/p90/p99, milliseconds), request and output-token throughput, and how many requests
succeeded. Exit status 1 when any request failed. Prompts are deterministic from --seed.

    python examples/workload/shared_prefix_chat.py --url http://127.0.0.1:8000 \\
        --conversations 32 --turns 4 --concurrency 8 --request-rate 4

Needs only aiohttp.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

_ONSETS = ("b", "c", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "st", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")


@dataclass
class Workload:
    """What to send: conversation shape, sizes and pacing."""

    # Conversations and the system prompts they share (conversation i uses prompt i % S).
    num_conversations: int = 16
    num_system_prompts: int = 2
    # Words per system prompt (the long shared prefix) and per user message.
    system_prompt_words: int = 600
    user_words: int = 30
    # Turns (requests) per conversation; each turn carries the whole history so far.
    turns: int = 3
    # Largest completion per request, in tokens.
    max_tokens: int = 64
    # Requests in flight at once, over all conversations.
    concurrency: int = 8
    # Poisson arrival rate in requests per second; inf: send as soon as a slot is free.
    request_rate: float = math.inf
    seed: int = 0


@dataclass
class Result:
    """One request's outcome; times in seconds."""

    conversation: int
    turn: int
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    error: str = ""

    @property
    def tpot(self) -> float | None:
        """Seconds per output token after the first; None with fewer than two tokens."""
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


@dataclass
class Conversation:
    """One chat: its index and its messages so far."""

    index: int
    messages: list[dict[str, str]] = field(default_factory=list)


def make_text(rng: random.Random, num_words: int) -> str:
    """num_words pseudo-words from rng, with a full stop every 12 words."""
    words = []
    for i in range(num_words):
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(1, 3)))
        words.append(word + ("." if i % 12 == 11 else ""))
    return " ".join(words)


def make_conversations(workload: Workload) -> tuple[list[str], list[Conversation]]:
    """The system prompts and each conversation's opening messages, deterministic from seed."""
    rng = random.Random(workload.seed)
    prompts = [
        f"You are assistant #{i}. Follow the handbook below.\n"
        + make_text(rng, workload.system_prompt_words)
        for i in range(workload.num_system_prompts)
    ]
    conversations = [
        Conversation(i, [{"role": "system", "content": prompts[i % len(prompts)]}])
        for i in range(workload.num_conversations)
    ]
    return prompts, conversations


def user_message(seed: int, conversation: int, turn: int, num_words: int) -> str:
    """The user's text for one turn (deterministic: it does not depend on the answers)."""
    rng = random.Random(f"{seed}/{conversation}/{turn}")
    return f"Question {turn + 1}: {make_text(rng, num_words)}?"


class PoissonClock:
    """Arrival times of a Poisson process; each request claims the next unclaimed one."""

    def __init__(self, rate: float, seed: int) -> None:
        self.rate = rate
        self.rng = random.Random(seed)
        self.next_time = time.monotonic()

    async def wait(self) -> None:
        """Sleep until the next arrival (at once when the rate is infinite)."""
        if math.isinf(self.rate):
            return
        self.next_time += self.rng.expovariate(self.rate)
        delay = self.next_time - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


class Client:
    """Streams chat completions from one endpoint and times them."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        model: str,
        api_key: str | None,
        extra_body: dict[str, Any],
    ) -> None:
        self.session = session
        self.endpoint = api_base(url) + "/chat/completions"
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.extra_body = extra_body

    async def chat(self, messages: list[dict[str, str]], max_tokens: int) -> tuple[Result, str]:
        """One streamed request: its timing (conversation/turn unset) and the answer's text."""
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            **self.extra_body,
        }
        start = time.perf_counter()
        ttft, chunks, usage_tokens, text = None, 0, None, []
        async with self.session.post(self.endpoint, json=body, headers=self.headers) as resp:
            if resp.status != 200:
                error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return Result(-1, -1, ok=False, error=error), ""
            async for event in sse_events(resp.content):
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens")
                for choice in event.get("choices") or []:
                    delta = choice.get("delta") or {}
                    piece = delta.get("content") or delta.get("reasoning_content") or ""
                    if piece:
                        if ttft is None:
                            ttft = time.perf_counter() - start
                        chunks += 1
                        text.append(piece)
        latency = time.perf_counter() - start
        tokens = usage_tokens if usage_tokens is not None else chunks
        result = Result(-1, -1, ok=True, ttft=latency if ttft is None else ttft, latency=latency)
        result.output_tokens = tokens
        return result, "".join(text)


async def sse_events(stream: aiohttp.StreamReader) -> Any:
    """The JSON payloads of a server-sent-event stream, up to `data: [DONE]`."""
    async for raw in stream:
        line = raw.decode(errors="replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        payload = json.loads(data)
        if "error" in payload:
            raise RuntimeError(f"error in stream: {payload['error']}")
        yield payload


def api_base(url: str) -> str:
    """`http://host:port` or `http://host:port/v1` -> `http://host:port/v1`."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


async def run_conversation(
    client: Client,
    conversation: Conversation,
    workload: Workload,
    slots: asyncio.Semaphore,
    clock: PoissonClock,
) -> list[Result]:
    """All turns of one conversation, in order; a failed turn ends it (the rest count failed)."""
    results = []
    for turn in range(workload.turns):
        text = user_message(workload.seed, conversation.index, turn, workload.user_words)
        conversation.messages.append({"role": "user", "content": text})
        async with slots:
            await clock.wait()
            try:
                result, answer = await client.chat(conversation.messages, workload.max_tokens)
            except (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError, ValueError) as exc:
                result, answer = Result(-1, -1, ok=False, error=f"{type(exc).__name__}: {exc}"), ""
        result.conversation, result.turn = conversation.index, turn
        results.append(result)
        if not result.ok:
            skipped = range(turn + 1, workload.turns)
            results += [Result(conversation.index, t, False, error="skipped") for t in skipped]
            break
        conversation.messages.append({"role": "assistant", "content": answer})
    return results


async def resolve_model(session: aiohttp.ClientSession, url: str, api_key: str | None) -> str:
    """The first model the endpoint lists (GET /v1/models)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with session.get(api_base(url) + "/models", headers=headers) as resp:
        resp.raise_for_status()
        models = (await resp.json())["data"]
    if not models:
        raise RuntimeError(f"{url} lists no models; pass --model")
    return models[0]["id"]


async def run(args: argparse.Namespace, workload: Workload) -> tuple[list[Result], float, str]:
    """Run the whole workload; returns the results, the wall time and the model used."""
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    connector = aiohttp.TCPConnector(limit=workload.concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        model = args.model or await resolve_model(session, args.url, args.api_key)
        extra: dict[str, Any] = {"temperature": args.temperature}
        if args.ignore_eos:
            extra["ignore_eos"] = True  # a vLLM extension: every answer has max_tokens
        client = Client(session, args.url, model, args.api_key, extra)
        _, conversations = make_conversations(workload)
        slots = asyncio.Semaphore(workload.concurrency)
        clock = PoissonClock(workload.request_rate, workload.seed)
        start = time.perf_counter()
        batches = await asyncio.gather(
            *(run_conversation(client, c, workload, slots, clock) for c in conversations)
        )
        elapsed = time.perf_counter() - start
    return [r for batch in batches for r in batch], elapsed, model


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linearly interpolated between closest ranks."""
    assert values, "no values"
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(results: list[Result], elapsed: float) -> dict[str, Any]:
    """Counts, throughput and p50/p90/p99/mean of TTFT, TPOT and latency (ms)."""
    ok = [r for r in results if r.ok]
    summary: dict[str, Any] = {
        "requests": len(results),
        "succeeded": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": elapsed,
        "request_throughput": len(ok) / elapsed if elapsed else 0.0,
        "output_token_throughput": sum(r.output_tokens for r in ok) / elapsed if elapsed else 0.0,
    }
    series = {
        "ttft_ms": [r.ttft * 1000 for r in ok],
        "tpot_ms": [r.tpot * 1000 for r in ok if r.tpot is not None],
        "latency_ms": [r.latency * 1000 for r in ok],
    }
    for name, values in series.items():
        if values:
            summary[name] = {f"p{q}": percentile(values, q) for q in (50, 90, 99)}
            summary[name]["mean"] = sum(values) / len(values)
    return summary


def format_summary(summary: dict[str, Any], model: str, url: str) -> str:
    """The human-readable report."""
    lines = [
        f"endpoint {url}  model {model}",
        f"requests: {summary['succeeded']} succeeded, {summary['failed']} failed "
        f"(of {summary['requests']}) in {summary['duration_s']:.2f} s",
        f"request throughput: {summary['request_throughput']:.2f} req/s, "
        f"output tokens: {summary['output_token_throughput']:.1f} tok/s",
    ]
    labels = {"ttft_ms": "TTFT", "tpot_ms": "TPOT", "latency_ms": "E2E latency"}
    for key, label in labels.items():
        if key in summary:
            s = summary[key]
            lines.append(
                f"{label + ' (ms):':18} p50 {s['p50']:9.1f}  p90 {s['p90']:9.1f}  "
                f"p99 {s['p99']:9.1f}  mean {s['mean']:9.1f}"
            )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The client's command line."""
    d = Workload()
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--url", required=True, help="base URL of the endpoint (with or without /v1)")
    add("--model", default=None, help="model name (default: the first of GET /v1/models)")
    add("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer key ($OPENAI_API_KEY)")
    add("--conversations", type=int, default=d.num_conversations, help="N conversations")
    add("--system-prompts", type=int, default=d.num_system_prompts, help="shared system prompts")
    add("--system-prompt-words", type=int, default=d.system_prompt_words, help="their length")
    add("--user-words", type=int, default=d.user_words, help="words per user message")
    add("--turns", type=int, default=d.turns, help="requests per conversation")
    add("--max-tokens", type=int, default=d.max_tokens, help="completion tokens per request")
    add("--concurrency", type=int, default=d.concurrency, help="requests in flight at most")
    add(
        "--request-rate",
        type=float,
        default=d.request_rate,
        help="Poisson arrival rate, requests/s (default: inf, as fast as --concurrency allows)",
    )
    add("--seed", type=int, default=d.seed, help="seed of prompts and arrivals")
    add("--temperature", type=float, default=0.0, help="sampling temperature")
    add("--ignore-eos", action="store_true", help="vLLM only: always generate --max-tokens")
    add("--timeout", type=float, default=600.0, help="seconds one request may take")
    add("--json", metavar="FILE", help="also write the summary and every request as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the workload and print the report; 1 if any request failed."""
    args = build_parser().parse_args(argv)
    if min(args.conversations, args.system_prompts, args.turns, args.concurrency) < 1:
        raise SystemExit("--conversations, --system-prompts, --turns, --concurrency must be >= 1")
    workload = Workload(
        num_conversations=args.conversations,
        num_system_prompts=args.system_prompts,
        system_prompt_words=args.system_prompt_words,
        user_words=args.user_words,
        turns=args.turns,
        max_tokens=args.max_tokens,
        concurrency=args.concurrency,
        request_rate=args.request_rate,
        seed=args.seed,
    )
    results, elapsed, model = asyncio.run(run(args, workload))
    summary = summarize(results, elapsed)
    print(format_summary(summary, model, args.url))
    errors = sorted({r.error for r in results if r.error and r.error != "skipped"})
    for error in errors[:5]:
        print(f"error: {error}", file=sys.stderr)
    if args.json:
        report = {"workload": asdict(workload), "summary": summary}
        report["requests"] = [asdict(r) for r in results]
        with open(args.json, "w") as out:
            json.dump(report, out, indent=1, default=str)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
