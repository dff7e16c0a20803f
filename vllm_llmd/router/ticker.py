"""A task on the running event loop that calls a function every interval while there is work:
the router's queues (the admission queue, prefill pacing) re-judge their waiting requests so,
besides at the events that pump them, as loads change with every poll."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Ticker:
    """Calls `tick()` every `interval_s` while `active()` holds (`ensure` starts it again)."""

    def __init__(
        self, tick: Callable[[], None], active: Callable[[], bool], interval_s: float
    ) -> None:
        self._tick, self._active, self.interval_s = tick, active, interval_s
        self._task: asyncio.Task[None] | None = None

    def ensure(self) -> None:
        """Running, on the current event loop (call it when work arrives)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        """Cancelled (its owner is shutting down)."""
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while self._active():
            self._tick()
            await asyncio.sleep(self.interval_s)
