"""The Redis connection of the router's shared backends (`RedisIndex`, `RedisSharedView`), and
`IndexUnavailable`, the one error they raise when Redis fails.

Every call is bounded: connecting waits at most `connect_timeout_s`, each reply at most
`socket_timeout_s`, and a failed call is tried again at most `retries` times after a short
backoff (redis-py's default would retry three times after sleeps of up to 10 s). So a Redis that
is down answers within `connect_timeout_s`, and one that hangs (paused, partitioned) within
about `(retries + 1) * socket_timeout_s`. Callers (the proxy, the ingestor) catch
`IndexUnavailable` and go on without the index: routing by load, counting lost events.

This module imports `redis` only when connecting, so `IndexUnavailable` can be caught by code
that runs without the redis extra.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis

DEFAULT_CONNECT_TIMEOUT_S = 1.0
DEFAULT_SOCKET_TIMEOUT_S = 1.0
DEFAULT_RETRIES = 1
# backoff before a retry: short, or the retry would cost more than the timeout saves
_RETRY_BACKOFF_CAP_S = 0.1
_RETRY_BACKOFF_BASE_S = 0.02


class IndexUnavailable(ConnectionError):
    """The index's (or shared view's) backend failed: unreachable, timed out or erroring."""


def connect(
    url: str,
    *,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S,
    retries: int = DEFAULT_RETRIES,
) -> redis.Redis:
    """A redis-py client for `url` with the bounds above (strings decoded). Connects lazily."""
    if connect_timeout_s <= 0 or socket_timeout_s <= 0:
        raise ValueError(
            "Redis timeouts must be > 0, got "
            f"connect_timeout_s={connect_timeout_s}, socket_timeout_s={socket_timeout_s}"
        )
    if retries < 0:
        raise ValueError(f"Redis retries must be >= 0, got {retries}")
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=connect_timeout_s,
        retry=Retry(
            ExponentialBackoff(cap=_RETRY_BACKOFF_CAP_S, base=_RETRY_BACKOFF_BASE_S), retries
        ),
    )


@contextmanager
def unavailable_on_failure(client: redis.Redis, what: str) -> Iterator[None]:
    """Turn any redis-py error inside the block into IndexUnavailable naming `what` and where."""
    import redis

    try:
        yield
    except redis.RedisError as exc:
        raise IndexUnavailable(f"{what}: Redis at {where(client)} failed: {exc}") from exc


def where(client: redis.Redis) -> str:
    """host:port/db of a client, without the password a URL may carry."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host')}:{kwargs.get('port')}/{kwargs.get('db', 0)}"
