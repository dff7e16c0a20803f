"""Block copies off vLLM's stream, ordered after the forward that wrote the blocks.

The tiers copy blocks on threads of their own (stores behind the steps, loads beside them).
On CUDA each such thread gets a stream of its own (`CopyStreams.copies`), so a store's copies
overlap the next forward instead of queueing in its stream. What orders them after the forward
that wrote the blocks is a mark (`CopyStreams.mark`: an event recorded on the caller's current
stream, the one vLLM enqueued the forward on, when vLLM hands the step over), not a shared
stream: whichever stream vLLM computes on, a store never reads a block before its forward
wrote it. The thread waits for its copies at the end of the block (the host buffer or the
device blocks are used next). On the CPU copies are synchronous and all of it does nothing.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

# this thread's copy stream per device, shared by every CopyStreams: copies nested on one
# thread (a pull's host-to-device copy, then the head slicer's scatter) stay in order
_thread_streams = threading.local()


class CopyStreams:
    """The copy stream of each copying thread on one device (nothing on the CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._on_cuda = device.type == "cuda"

    def mark(self) -> torch.cuda.Event | None:
        """On the thread that enqueued the forward: the point the copies must come after."""
        if not self._on_cuda:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    @contextlib.contextmanager
    def copies(self, after: torch.cuda.Event | None = None) -> Iterator[None]:
        """Enqueue the block's copies on this thread's stream, after `after` (a mark); wait
        for them at its end, also when it raised (a buffer is never reused under a copy)."""
        if not self._on_cuda:
            yield
            return
        streams: dict[torch.device, torch.cuda.Stream] = _thread_streams.__dict__
        stream = streams.get(self.device)
        if stream is None:
            stream = streams[self.device] = torch.cuda.Stream(self.device)
        if after is not None:
            stream.wait_event(after)
        try:
            with torch.cuda.stream(stream):
                yield
        finally:
            stream.synchronize()
