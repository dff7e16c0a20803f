"""One connection to one LMCache MP server, with bounded calls and a health state.

Calls go through LMCache's own client (`RequestClientFactory`, ZMQ DEALER → the server's
ROUTER; `lmcache/v1/multiprocess/transport/base.py` lists the RPCs). ZMQ never fails a send to
a dead peer, it queues it, so liveness is ours to track:

- every call waits at most `timeout_s`; a call with no answer by then marks the server *down*
  (one warning line) and raises `SharedTierUnavailable`;
- while down, every call fails at once (the connector then recomputes); a heartbeat thread
  pings every `retry_s` and the first answer marks it *up* again (one info line), after running
  `on_recover` (the worker half re-registers its KV layout there);
- the heartbeat also runs `check` each beat: a worker reports there that the server it mapped
  was restarted (its shared-memory pool is another file now), which marks it down at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from vllm_llmd.log import get_logger

logger = get_logger(__name__)

LMCACHE_EXTRA = "vllm-llmd[lmcache]"


class SharedTierError(RuntimeError):
    """A shared-tier call failed; the caller recomputes what it would have loaded."""


class SharedTierUnavailable(SharedTierError):
    """The LMCache server is down (or not answered yet): nothing was sent."""


def import_lmcache() -> SimpleNamespace:
    """LMCache's client API, imported on first use; ImportError naming the extra if missing."""
    try:
        from lmcache.v1.multiprocess.custom_types import (
            IPCCacheServerKey,
            RegisterEngineDrivenContextPayload,
        )
        from lmcache.v1.multiprocess.transport.factory import RequestClientFactory
    except ImportError as exc:
        raise ImportError(
            f"LLMDConnector: shared_tier_url is set, but LMCache cannot be imported ({exc}). "
            f"Install the extra: pip install '{LMCACHE_EXTRA}'"
        ) from exc
    return SimpleNamespace(
        IPCCacheServerKey=IPCCacheServerKey,
        RegisterEngineDrivenContextPayload=RegisterEngineDrivenContextPayload,
        RequestClientFactory=RequestClientFactory,
    )


class SharedTierClient:
    """Bounded RPCs to one LMCache MP server, and whether it is up."""

    def __init__(
        self,
        url: str,
        timeout_s: float,
        retry_s: float,
        *,
        instance_id: int | None = None,
        on_recover: Callable[[], None] | None = None,
        check: Callable[[], str | None] | None = None,
        chunk_tokens: int | None = None,
        name: str = "client",
    ) -> None:
        import zmq

        self.lmcache = import_lmcache()
        self.url = url
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        # the server's --chunk-size must be this (checked each time it comes up)
        self.chunk_tokens = chunk_tokens
        # sent with every ping, so the server does not reap this worker's registration
        self.instance_id = instance_id
        self._on_recover = on_recover
        self._check = check
        self._client = self.lmcache.RequestClientFactory.create(url, context=zmq.Context.instance())
        self._up = threading.Event()
        self._stop = threading.Event()
        # False until the first answer; a server that never answered is said once, at its
        # first miss, so a shared_tier_url pointing at nothing is never silent
        self._ever_up = False
        self._said_never_reached = False
        self._thread = threading.Thread(
            target=self._heartbeat, name=f"llmd-shared-{name}", daemon=True
        )
        self._thread.start()

    @property
    def is_up(self) -> bool:
        return self._up.is_set()

    def wait_up(self, timeout: float) -> bool:
        """Wait until the server answered once (tests, start-up logs)."""
        return self._up.wait(timeout)

    # ---- calls ---------------------------------------------------------------------------

    def submit(self, method: str, *args: Any, even_if_down: bool = False) -> Any:
        """Send one RPC; its MessagingFuture. SharedTierUnavailable while the server is down."""
        if not (self.is_up or even_if_down):
            raise SharedTierUnavailable(f"LMCache server {self.url} is down")
        return getattr(self._client, method)(*args)

    def call(
        self, method: str, *args: Any, timeout_s: float | None = None, even_if_down: bool = False
    ) -> Any:
        """One RPC and its answer, waiting at most timeout_s (default: the client's).

        even_if_down: send it anyway (the recovery path registers before the server is up).
        """
        future = self.submit(method, *args, even_if_down=even_if_down)
        return self.wait(future, method, timeout_s)

    def wait(self, future: Any, what: str, timeout_s: float | None = None) -> Any:
        """The answer of a submitted RPC; a timeout marks the server down."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            return future.result(timeout=timeout)
        except TimeoutError:
            self.mark_down(f"{what} got no answer in {timeout:g}s")
            raise SharedTierUnavailable(f"{what}: no answer from {self.url}") from None
        except Exception as exc:  # the server raised: this call failed, the server is up
            raise SharedTierError(f"{what} failed on {self.url}: {exc}") from exc

    def mark_down(self, reason: str) -> None:
        if not self._up.is_set():
            if not (self._ever_up or self._said_never_reached):
                self._said_never_reached = True
                logger.warning(
                    "LLMDConnector shared tier: no LMCache server answers at shared_tier_url "
                    "%s (%s); serving without it (recompute) and retrying every %gs. Start "
                    "`lmcache server` there, or fix shared_tier_url",
                    self.url,
                    reason,
                    self.retry_s,
                )
            return
        self._up.clear()
        logger.warning(
            "LLMDConnector shared tier: LMCache server %s is unreachable (%s); serving "
            "without it (recompute) and retrying every %gs",
            self.url,
            reason,
            self.retry_s,
        )

    # ---- heartbeat -----------------------------------------------------------------------

    def _heartbeat(self) -> None:
        delay = 0.0
        while not self._stop.wait(delay):
            delay = self.retry_s
            try:
                self._beat()
            except Exception as exc:  # never die: a dead heartbeat leaves the tier down for good
                logger.exception(
                    "LLMDConnector shared tier: heartbeat of %s failed; retrying in %gs",
                    self.url,
                    self.retry_s,
                )
                self.mark_down(f"heartbeat: {type(exc).__name__}")

    def _beat(self) -> None:
        problem = self._check() if self._check is not None else None
        if problem:
            self.mark_down(problem)
        try:
            self._client.ping(self.instance_id).result(timeout=self.timeout_s)
        except Exception as exc:
            self.mark_down(f"ping: {type(exc).__name__} {exc}".strip())
            return
        if self.is_up:
            return
        try:
            self._check_chunk_size()
            if self._on_recover is not None:
                self._on_recover()
        except Exception as exc:
            logger.warning(
                "LLMDConnector shared tier: LMCache server %s answers, but setting up "
                "failed: %s; retrying in %gs",
                self.url,
                exc,
                self.retry_s,
            )
            return
        logger.info(
            "LLMDConnector shared tier: LMCache server %s %s",
            self.url,
            "answers again; shared tier back on" if self._ever_up else "connected",
        )
        self._ever_up = True
        self._up.set()

    def _check_chunk_size(self) -> None:
        if self.chunk_tokens is None:
            return
        theirs = self.call("get_chunk_size", even_if_down=True)
        if theirs != self.chunk_tokens:
            raise SharedTierError(
                f"its chunk size is {theirs} tokens, shared_tier_chunk_tokens is "
                f"{self.chunk_tokens}: set them alike"
            )

    def close(self) -> None:
        self._stop.set()
        self._up.clear()
        self._thread.join(timeout=self.timeout_s + 1)
        try:
            self._client.close()
        except Exception:  # closing is best effort at shutdown
            logger.debug("closing the LMCache client failed", exc_info=True)
