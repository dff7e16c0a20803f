"""Helpers the KV-event tests share: driving a `Subscriber` until what a test waits for came."""

from __future__ import annotations

import time
from collections.abc import Callable

from vllm_llmd.events.subscriber import Subscriber
from vllm_llmd.events.updates import Update


def poll_until(
    subscriber: Subscriber,
    done: Callable[[list[Update]], bool],
    timeout: float = 10.0,
    interval: float = 0.05,
) -> list[Update]:
    """Every update `subscriber` brings until `done(updates)` holds or `timeout` passes."""
    updates: list[Update] = []
    deadline = time.monotonic() + timeout
    while not done(updates) and time.monotonic() < deadline:
        updates += subscriber.poll(interval)
    return updates
