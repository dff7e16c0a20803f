"""Blocking work the router must not do on its event loop (tokenizing, chat templates, Redis).

`OffLoop` runs a call on its own bounded pool of threads and waits at most `timeout_s` for it.
A call still running at the timeout keeps its thread until it ends (a thread cannot be
stopped), so at most `max_workers` such calls hold the pool; later ones queue, and leave the
queue when their own wait times out. The caller decides what a timeout means (the router routes
by load alone); the event loop, and with it /health and every other request, never waits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class OffLoop:
    """A bounded thread pool whose calls are awaited with a timeout."""

    def __init__(self, name: str, max_workers: int, timeout_s: float) -> None:
        if max_workers < 1 or timeout_s <= 0:
            raise ValueError(f"{name}: need max_workers >= 1 and timeout_s > 0")
        self.name = name
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """fn(*args) on the pool. TimeoutError after timeout_s; fn's own exceptions as raised."""
        call = asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        return await asyncio.wait_for(call, self.timeout_s)

    def close(self) -> None:
        """Drop queued calls; running ones end on their own (their threads are not joined)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
