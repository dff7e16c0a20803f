"""The requests a simulation replays: block hashes, lengths and arrival times.

Every workload names its prompts by vLLM's block hashes (`PrefixHasher`, the chain the router
and the engine compute), over synthetic token ids: equal prefixes give equal hashes, as they
would from a tokenizer. Requests come lazily, in arrival order, so 100k of them never sit in
memory at once.

- `shared_prefix`: llm-d's prefix-cache benchmark shape: `num_groups` groups (150), each with a
  shared prefix (6,000 tokens); a request is its group's prefix plus a unique suffix (a few
  hundred tokens). Groups are drawn uniformly; arrivals are Poisson. With `hot_share`, that
  share of the requests goes to the hot group of the moment instead, a new one every
  `hot_every` requests (a prefix that turns hot on the pod its first request lands on).
- `multi_turn`: conversations of `turns` turns; each turn resends the conversation so far (a
  system prompt shared by a group of users, the earlier questions and answers) plus a new
  question, so each prompt extends the last one and the answer's blocks are reused. Open loop
  by default (each turn at a time fixed in advance); with `ChatShape.closed_loop`, a turn
  comes a think time after the previous turn's answer ends, as a user would send it
  (`SimRequest.after`), so a slow pod slows its users' next turns.
- `mooncake_trace`: a trace in the public Mooncake format, one JSON object a line:
  `{"timestamp": ms, "input_length": n, "output_length": m, "hash_ids": [...]}`, one hash id
  per 512-token block. Equal hash ids in equal positions give equal block hashes here.
"""

from __future__ import annotations

import heapq
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vllm_llmd.hashing import BlockHash, PrefixHasher, to_event_hash

# a token id outside any vocabulary marks the start of each distinct text, so two texts never
# share a first block by accident (the hash takes any int)
_MARKER_BASE = 1 << 40
_VOCAB = 32_000
MOONCAKE_BLOCK_TOKENS = 512


@dataclass(slots=True)
class SimRequest:
    """One request as the simulator sees it."""

    request_id: int
    arrival_s: float
    num_prompt_tokens: int
    num_output_tokens: int
    # event hashes of the prompt's full blocks, in order
    prompt_hashes: list[int]
    # event hashes of the full blocks the answer completes (cached when it ends; the next
    # turn of a conversation starts with them)
    output_hashes: list[int] = field(default_factory=list)
    # closed loop: the id of the request whose answer this one waits for (its arrival_s is
    # then ignored: it arrives think_s after that answer ends). A workload yields it after
    # that request and before any request that arrives later than that request.
    after: int | None = None
    think_s: float = 0.0


def synthetic_tokens(marker: int, num_tokens: int) -> list[int]:
    """Token ids of a distinct text: a marker, then a cheap deterministic sequence."""
    return [_MARKER_BASE + marker] + [
        (marker * 7919 + i * 31) % _VOCAB for i in range(1, num_tokens)
    ]


class Chain:
    """A text growing at its end, and the hashes of its full blocks (vLLM's chain)."""

    def __init__(self, hasher: PrefixHasher) -> None:
        self.hasher = hasher
        self.hashes: list[int] = []
        self.num_tokens = 0
        self._parent: BlockHash | None = None
        self._tail: list[int] = []  # tokens after the last full block

    def extend(self, tokens: list[int]) -> list[int]:
        """Append tokens; the event hashes of the blocks they complete."""
        size = self.hasher.block_size
        self._tail.extend(tokens)
        self.num_tokens += len(tokens)
        new: list[int] = []
        while len(self._tail) >= size:
            self._parent = self.hasher.hash_block(self._parent, self._tail[:size])
            new.append(to_event_hash(self._parent))
            del self._tail[:size]
        self.hashes.extend(new)
        return new

    def copy(self) -> Chain:
        other = Chain(self.hasher)
        other.hashes = list(self.hashes)
        other.num_tokens, other._parent, other._tail = (
            self.num_tokens,
            self._parent,
            list(self._tail),
        )
        return other


def poisson_arrivals(rate: float, rng: random.Random) -> Iterator[float]:
    """Arrival times of a Poisson process of `rate` per second, from 0."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    now = 0.0
    while True:
        now += rng.expovariate(rate)
        yield now


@dataclass(frozen=True)
class SharedPrefixShape:
    """llm-d's shared-prefix workload (see the module docstring)."""

    num_groups: int = 150
    prefix_tokens: int = 6000
    # each suffix is uniform in suffix_tokens * [0.5, 1.5]
    suffix_tokens: int = 300
    output_tokens: int = 100
    # share of the requests on the hot group of the moment (0: none), a new one every
    # hot_every requests
    hot_share: float = 0.0
    hot_every: int = 1000


def shared_prefix(
    hasher: PrefixHasher, num_requests: int, rate: float, shape: SharedPrefixShape, seed: int = 0
) -> Iterator[SimRequest]:
    """llm-d-shaped requests: a random group's prefix plus a unique suffix, Poisson arrivals."""
    rng = random.Random(seed)
    groups: dict[int, Chain] = {}  # each group's prefix, hashed once
    arrivals = poisson_arrivals(rate, rng)
    for request_id in range(num_requests):
        group = rng.randrange(shape.num_groups)
        if shape.hot_share and rng.random() < shape.hot_share:
            group = -1 - request_id // shape.hot_every  # hot groups: markers of their own
        if group not in groups:
            if group < 0:  # the last hot group is cold now: forget it
                for cold in [g for g in groups if g < 0]:
                    del groups[cold]
            groups[group] = Chain(hasher)
            groups[group].extend(synthetic_tokens(group, shape.prefix_tokens))
        chain = groups[group].copy()
        suffix = rng.randint(shape.suffix_tokens // 2, shape.suffix_tokens * 3 // 2)
        chain.extend(synthetic_tokens(shape.num_groups + request_id, max(1, suffix)))
        yield SimRequest(
            request_id, next(arrivals), chain.num_tokens, shape.output_tokens, chain.hashes
        )


@dataclass(frozen=True)
class ChatShape:
    """Multi-turn chat (see the module docstring)."""

    turns: int = 5
    # users share one of num_system_prompts system prompts
    num_system_prompts: int = 20
    system_tokens: int = 2000
    question_tokens: int = 200
    output_tokens: int = 200
    # seconds between a conversation's turns (a user reading and typing)
    think_s: float = 10.0
    # a turn waits for the previous turn's answer (plus the think time), not a fixed time
    closed_loop: bool = False


def multi_turn(
    hasher: PrefixHasher, num_requests: int, rate: float, shape: ChatShape, seed: int = 0
) -> Iterator[SimRequest]:
    """Chat turns; conversations start at rate / turns per second. Open loop: in arrival order.
    Closed loop: conversation by conversation, each turn after the one it follows."""
    rng = random.Random(seed)
    starts = poisson_arrivals(rate / shape.turns, rng)
    num_conversations = -(-num_requests // shape.turns)
    pending: list[tuple[float, int, int]] = []  # (arrival, conversation, turn)
    for conversation in range(num_conversations):
        arrival = next(starts)
        for turn in range(shape.turns):
            pending.append((arrival, conversation, turn))
            arrival += shape.think_s * rng.uniform(0.5, 1.5)
    if shape.closed_loop:
        pending.sort(key=lambda at: (at[1], at[2]))  # a conversation's turns one after another
    else:
        heapq.heapify(pending)
    chats: dict[int, Chain] = {}
    previous: dict[int, tuple[int, float]] = {}  # conversation -> (last turn's id, its time)
    marker = shape.num_system_prompts
    for request_id in range(num_requests):
        if shape.closed_loop:
            arrival, conversation, turn = pending[request_id]
        else:
            arrival, conversation, turn = heapq.heappop(pending)
        if turn == 0:
            chats[conversation] = Chain(hasher)
            system = conversation % shape.num_system_prompts
            chats[conversation].extend(synthetic_tokens(system, shape.system_tokens))
        chain = chats[conversation]
        marker += 1
        chain.extend(synthetic_tokens(marker, shape.question_tokens))
        prompt_hashes, num_prompt = list(chain.hashes), chain.num_tokens
        marker += 1
        output_hashes = chain.extend(synthetic_tokens(marker, shape.output_tokens))
        if turn == shape.turns - 1:
            del chats[conversation]
        request = SimRequest(
            request_id, arrival, num_prompt, shape.output_tokens, prompt_hashes, output_hashes
        )
        if shape.closed_loop:
            if turn > 0:  # the user thinks as long as the open loop's gap between turns
                request.after, before_s = previous[conversation]
                request.think_s = arrival - before_s
            previous[conversation] = (request_id, arrival)
            if turn == shape.turns - 1:
                del previous[conversation]
        yield request


def mooncake_trace(
    path: str | Path, hasher: PrefixHasher, time_scale: float = 1.0, limit: int | None = None
) -> Iterator[SimRequest]:
    """Requests of a Mooncake-format trace (module docstring), arrivals scaled by time_scale."""
    if hasher.block_size > MOONCAKE_BLOCK_TOKENS or MOONCAKE_BLOCK_TOKENS % hasher.block_size:
        raise ValueError(f"block_size must divide {MOONCAKE_BLOCK_TOKENS}")
    # (parent digest, hash id, tokens) -> the digests of that trace block's engine blocks
    memo: dict[tuple[BlockHash | None, int, int], list[BlockHash]] = {}
    size = hasher.block_size
    with open(path) as lines:
        for request_id, line in enumerate(lines):
            if limit is not None and request_id >= limit:
                return
            if not line.strip():
                continue
            record = json.loads(line)
            num_tokens, hash_ids = int(record["input_length"]), record["hash_ids"]
            parent: BlockHash | None = None
            digests: list[BlockHash] = []
            for position, hash_id in enumerate(hash_ids):
                in_block = min(MOONCAKE_BLOCK_TOKENS, num_tokens - position * MOONCAKE_BLOCK_TOKENS)
                if in_block < size:
                    break
                key = (parent, int(hash_id), in_block)
                if key not in memo:
                    tokens = synthetic_tokens(int(hash_id), in_block)
                    chain, link = [], parent
                    for start in range(0, in_block - size + 1, size):
                        link = hasher.hash_block(link, tokens[start : start + size])
                        chain.append(link)
                    memo[key] = chain
                digests.extend(memo[key])
                parent = digests[-1]
            yield SimRequest(
                request_id,
                float(record["timestamp"]) / 1000.0 * time_scale,
                num_tokens,
                max(1, int(record["output_length"])),
                [to_event_hash(d) for d in digests],
            )
