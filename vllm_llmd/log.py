"""Loggers for code that runs inside vLLM processes, and a throttle for recurring failures.

vLLM configures handlers only for its own "vllm" logger tree, so a plain
`logging.getLogger("vllm_llmd...")` inside `vllm serve` prints nothing. Naming our loggers
under "vllm." makes them use vLLM's handlers, format and `VLLM_LOGGING_LEVEL`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


def get_logger(module_name: str) -> logging.Logger:
    """Logger for a module that runs in a vLLM process (pass `__name__`)."""
    return logging.getLogger(f"vllm.{module_name}")


class ThrottledLog:
    """Logs a failure that can repeat on every request or chunk (a full disk, a Redis outage)
    at most once per interval, saying how many like it were not logged: the first one is
    always seen, and the log cannot drown the process."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last = float("-inf")
        self._suppressed = 0

    def log(self, level: int, message: str, *args: object, exc_info: bool = False) -> bool:
        """Log unless one was logged within the interval; True when it was logged."""
        with self._lock:
            now = self._clock()
            if now - self._last < self.interval_s:
                self._suppressed += 1
                return False
            suppressed, self._suppressed, self._last = self._suppressed, 0, now
        if suppressed:
            message += f" ({suppressed} more like it since the last report)"
        self.logger.log(level, message, *args, exc_info=exc_info)
        return True

    def warning(self, message: str, *args: object, exc_info: bool = False) -> bool:
        return self.log(logging.WARNING, message, *args, exc_info=exc_info)

    def error(self, message: str, *args: object, exc_info: bool = False) -> bool:
        return self.log(logging.ERROR, message, *args, exc_info=exc_info)
