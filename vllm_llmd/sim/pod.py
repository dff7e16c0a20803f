"""A simulated vLLM pod: a prefix cache, a continuous-batching scheduler, KV events out.

Each engine step (vLLM V1's scheduler, simplified):
1. schedule one token of every decoding request, then the next chunks of the prompts being
   prefilled, oldest first, then waiting requests in order, up to the token budget
   (`max_batched_tokens`, chunked prefill) and `max_num_seqs`. A waiting request is admitted
   when the cache can hold the whole request (prompt and answer: reserving it all up front
   stands in for vLLM's preemption, which this model does not have), its hit taken then. A
   chunk's full blocks are cached as it is scheduled, as vLLM caches them on allocation, so a
   request scheduled after another in the same step hits what that one computes in it. A
   request with host-tier blocks waits out the step they load in and prefills from the next,
   as vLLM's asynchronous connector loads do;
2. run the step for `profile.step_s(...)` seconds (plus the host tier's loads);
3. give a finished prompt its first token, end the requests whose answer is complete (their
   answer's blocks are cached), and publish the step's KV events.

With only decodes running, nothing changes between finishes, so the pod sleeps until the next
one in a single timeout; a request arriving meanwhile interrupts it, and the pod resumes at the
next step boundary. That keeps the simulation's events per request, not per token.

The gauges a scrape reads (`load`) are those of the last step's end, as vLLM's are: its engine
sends its scheduler's stats with each step's output, so a request that arrives during a step
shows at the end of the next, and a long prefill step (0.6 s on the CPU pods) holds them
still. A router reading exact gauges instead made different choices with small caches, where
KV usage crosses the saturation threshold within a step (docs/simulator.md).
"""

from __future__ import annotations

import dataclasses
import heapq
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import simpy

from vllm_llmd.events.model import EventBatch
from vllm_llmd.router.load import PodLoad
from vllm_llmd.sim.cache import Holding, PrefixCache
from vllm_llmd.sim.profile import LatencyProfile
from vllm_llmd.sim.workloads import SimRequest


@dataclass(frozen=True)
class PodConfig:
    """One simulated pod's engine settings."""

    # device KV blocks (default: ~397k tokens, an H100 80GB with Llama-3.1-8B bf16, assumed)
    capacity_blocks: int = 6200
    block_size: int = 64
    max_num_seqs: int = 256
    max_batched_tokens: int = 8192
    # host tier: blocks, and seconds to load one onto the device (0 blocks: no tier).
    # 64 tokens x 128 KiB at ~25 GB/s of PCIe: ~0.34 ms a block (assumed)
    host_capacity_blocks: int = 0
    host_load_s_per_block: float = 0.00034
    # a hot-prefix copy from another pod: seconds a block, 64 tokens x 128 KiB over a
    # ~25 GB/s RDMA link (assumed, as the host tier's)
    copy_s_per_block: float = 0.00034


@dataclass(slots=True)
class Outcome:
    """What happened to one request."""

    request_id: int
    pod: str
    arrival_s: float
    ttft_s: float
    # mean seconds per output token after the first (0 for a one-token answer)
    tpot_s: float
    num_prompt_tokens: int
    # prompt tokens found cached on the device, and on the host
    device_hit_tokens: int
    host_hit_tokens: int


@dataclass(slots=True)
class _Running:
    """An admitted request's progress."""

    request: SimRequest
    holding: Holding
    # prompt tokens whose KV exists (found cached, then computed)
    computed: int
    # prompt tokens found cached at admission, and of those on the device
    cached_tokens: int
    device_hit_tokens: int
    first_s: float = 0.0
    start_step: int = 0


EventSink = Callable[[str, EventBatch], None]
# a SimPy process body: yields events, is sent their values
Process = Generator[simpy.Event, Any, None]
OutcomeSink = Callable[[Outcome], None]


class SimPod:
    """One pod: `submit` requests; outcomes and KV-event batches go to the sinks given."""

    def __init__(
        self,
        env: simpy.Environment,
        pod_id: str,
        config: PodConfig,
        profile: LatencyProfile,
        publish: EventSink,
        done: OutcomeSink,
        first_token: Callable[[int], None] | None = None,
    ) -> None:
        self.env = env
        # told a request's id when its first token is out (the router's answer begins)
        self.first_token = first_token
        self.pod_id = pod_id
        self.config = config
        self.profile = profile
        self.cache = PrefixCache(
            config.capacity_blocks, config.block_size, config.host_capacity_blocks
        )
        self._publish = publish
        self._done = done
        self._waiting: deque[SimRequest] = deque()
        self._prefilling: deque[_Running] = deque()
        # decoding requests by the step count at which their answer is complete
        self._decoding: list[tuple[int, int, _Running]] = []
        self._decode_context = 0  # tokens the decoding requests attend to
        self._steps = 0
        self._idle: simpy.Event | None = None
        self._sleeping = False  # in a decode-only stretch that an arrival may cut short
        self._gauges = PodLoad()  # as of the last step's end (see the module doc)
        self._arrived_in_step = 0  # requests submitted since the step began
        self.num_requests = 0
        self._process = env.process(self._run())

    def submit(self, request: SimRequest) -> None:
        self._waiting.append(request)
        self.num_requests += 1
        self._arrived_in_step += 1
        if self._idle is not None and not self._idle.triggered:
            self._idle.succeed()
        elif self._sleeping:
            self._sleeping = False
            self._process.interrupt()

    def receive(self, hashes: list[int]) -> None:
        """A hot prefix's blocks arrive from another pod (the router's copy): cached here,
        published at once."""
        self.cache.receive(hashes)
        self._flush_events()

    def load(self, num_in_flight: int = 0) -> PodLoad:
        """What the pod's /metrics would say now (vllm:num_requests_* and KV usage): the
        gauges of the last step's end."""
        return dataclasses.replace(self._gauges, num_in_flight=num_in_flight)

    # ---- the engine loop ------------------------------------------------------------------

    def _run(self) -> Process:  # the pod's SimPy process
        while True:
            self._arrived_in_step = 0  # vLLM takes in what arrived before it schedules
            chunks, loads = self._schedule()
            if chunks or loads:
                yield from self._mixed_step(chunks, loads)
            elif self._decoding:
                yield from self._decode_stretch()
            else:
                self._idle = self.env.event()
                yield self._idle
                self._idle = None

    def _schedule(self) -> tuple[list[tuple[_Running, int]], int]:
        """One step's prompt chunks and host-tier block loads, as vLLM's scheduler picks them:
        the admitted prompts' next chunks first, oldest first, then waiting requests in order
        while the token budget lasts. A waiting request's hit is taken when it is scheduled,
        and a chunk's full blocks are cached as it is scheduled (vLLM caches them on
        allocation; the forward pass writes each layer's KV before attending), so a request
        scheduled after another in the same step hits the blocks that one computes in it, and
        two requests sent together with one new document compute it once."""
        budget = self.config.max_batched_tokens - len(self._decoding)
        chunks: list[tuple[_Running, int]] = []
        loads = 0
        for running in self._prefilling:
            if budget <= 0:
                break
            take = self._chunk(running, budget)
            chunks.append((running, take))
            budget -= take
        size, cache = self.config.block_size, self.cache
        while (
            budget > 0
            and self._waiting
            and len(self._prefilling) + len(self._decoding) < self.config.max_num_seqs
        ):
            request = self._waiting[0]
            num_blocks = -(-(request.num_prompt_tokens + request.num_output_tokens) // size)
            hit = cache.hit(request.prompt_hashes)
            if not cache.can_allocate(request.prompt_hashes, num_blocks, hit):
                break  # first come, first served: the head waits for room
            self._waiting.popleft()
            holding = cache.allocate(request.prompt_hashes, num_blocks, hit)
            # vLLM recomputes the last prompt token of a full hit, to sample from it
            device = min(hit.device_blocks * size, request.num_prompt_tokens - 1)
            cached = min(
                (hit.device_blocks + hit.host_blocks) * size, request.num_prompt_tokens - 1
            )
            running = _Running(request, holding, cached, cached, device)
            self._prefilling.append(running)
            if hit.host_blocks:
                # vLLM loads external KV asynchronously: the request waits out the step its
                # load runs in (WAITING_FOR_REMOTE_KVS) and prefills from the next one
                loads += hit.host_blocks
                continue
            take = self._chunk(running, budget)
            chunks.append((running, take))
            budget -= take
        return chunks, loads

    def _chunk(self, running: _Running, budget: int) -> int:
        """The request's next prompt chunk within the budget, its full blocks cached now."""
        take = min(budget, running.request.num_prompt_tokens - running.computed)
        size = self.config.block_size
        hashes = running.request.prompt_hashes
        self.cache.cache(
            running.holding, hashes[running.computed // size : (running.computed + take) // size]
        )
        return take

    def _mixed_step(self, chunks: list[tuple[_Running, int]], loads: int) -> Process:
        prefill_tokens = sum(take for _, take in chunks)
        attended = sum(running.computed for running, _ in chunks)
        seconds = self.profile.step_s(
            prefill_tokens, attended, len(self._decoding), self._decode_context
        )
        yield self.env.timeout(seconds + loads * self.config.host_load_s_per_block)
        self._advance(1)
        for running, take in chunks:
            running.computed += take
            if running.computed == running.request.num_prompt_tokens:
                self._first_token(running)
        self._finish_due()
        self._end_step()

    def _decode_stretch(self) -> Process:
        """Decode steps until the next answer ends, or to the step an arrival cuts in at."""
        step_s = self.profile.step_s(0, 0, len(self._decoding), self._decode_context)
        steps = self._decoding[0][0] - self._steps
        start = self.env.now
        self._sleeping = not self._waiting  # else the head waits for room: so would a newcomer
        try:
            yield self.env.timeout(steps * step_s)
        except simpy.Interrupt:
            done = min(steps, int((self.env.now - start) / step_s) + 1)
            rest = start + done * step_s - self.env.now
            if rest > 0:
                yield self.env.timeout(rest)
            steps = done
        self._sleeping = False
        self._advance(steps)
        self._finish_due()
        self._end_step()

    # ---- bookkeeping ----------------------------------------------------------------------

    def _advance(self, steps: int) -> None:
        self._steps += steps
        self._decode_context += steps * len(self._decoding)

    def _first_token(self, running: _Running) -> None:
        self._prefilling.remove(running)
        running.first_s = self.env.now
        if self.first_token is not None:
            self.first_token(running.request.request_id)
        running.start_step = self._steps
        request = running.request
        finish_step = self._steps + request.num_output_tokens - 1
        heapq.heappush(self._decoding, (finish_step, request.request_id, running))
        self._decode_context += request.num_prompt_tokens + 1

    def _finish_due(self) -> None:
        while self._decoding and self._decoding[0][0] <= self._steps:
            _, _, running = heapq.heappop(self._decoding)
            request = running.request
            self._decode_context -= request.num_prompt_tokens + 1 + self._steps - running.start_step
            self.cache.cache(running.holding, request.output_hashes)
            self.cache.free(running.holding)
            outputs = request.num_output_tokens
            self._done(
                Outcome(
                    request.request_id,
                    self.pod_id,
                    request.arrival_s,
                    running.first_s - request.arrival_s + self.profile.request_s,
                    (self.env.now - running.first_s) / (outputs - 1) if outputs > 1 else 0.0,
                    request.num_prompt_tokens,
                    running.device_hit_tokens,
                    running.cached_tokens - running.device_hit_tokens,
                )
            )

    def _flush_events(self) -> None:
        events = self.cache.take_events()
        if events:
            self._publish(self.pod_id, EventBatch(ts=self.env.now, events=tuple(events)))

    def _end_step(self) -> None:
        """The step's KV events out, its gauges set."""
        self._flush_events()
        self._gauges = PodLoad(
            # requests that arrived during the step reach the scheduler after it
            num_waiting=len(self._waiting) - self._arrived_in_step,
            num_running=len(self._prefilling) + len(self._decoding),
            kv_usage=self.cache.usage,
            kv_blocks=self.config.capacity_blocks,
        )
