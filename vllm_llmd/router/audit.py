"""The audit log: one JSON line per routing decision (`--audit-log`).

Auditing must never cost a request: a record that cannot be written (disk full, the file or its
folder gone, no permission) is dropped, counted, and logged at most once per
`FAILURE_LOG_INTERVAL_S`; the request is served. The file is reopened when it was removed or
replaced (rotation), as logging's WatchedFileHandler does, so records go where the path points.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import IO, Any

from vllm_llmd.events.model import MEDIUM_SHARED
from vllm_llmd.log import ThrottledLog
from vllm_llmd.router.routing import Route

logger = logging.getLogger(__name__)

FAILURE_LOG_INTERVAL_S = 60.0


class AuditLog:
    """Appends records to `path`; `write` never raises for the file's sake."""

    def __init__(
        self,
        path: str,
        on_failure: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._on_failure = on_failure
        self._file: IO[str] | None = None
        self._identity: tuple[int, int] | None = None  # (device, inode) of the open file
        self._failures_log = ThrottledLog(logger, FAILURE_LOG_INTERVAL_S, clock)
        try:
            self._open()
        except OSError as exc:  # served anyway; each record it drops is counted
            self._log_failure(exc)

    def write(self, record: Mapping[str, Any]) -> bool:
        """Append one record; False (counted, logged now and then) when it could not be."""
        try:
            self._reopen_if_moved()
            if self._file is None:
                self._file = self._open()
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except (OSError, ValueError) as exc:  # ValueError: a closed file
            self._failed(exc)
            self._discard()  # its buffer too: reopened for the next record
            return False
        return True

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:  # unflushed bytes on a full disk
                self._log_failure(exc)
            self._file = None

    def _discard(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:  # its unwritten bytes: already counted as a failure
                pass
            self._file = None

    def _open(self) -> IO[str]:
        """Open the path for appending; OSError when it cannot be."""
        self._file = open(self.path, "a")  # kept open across requests
        stat = os.fstat(self._file.fileno())
        self._identity = (stat.st_dev, stat.st_ino)
        return self._file

    def _reopen_if_moved(self) -> None:
        if self._file is None:
            return
        try:
            stat = os.stat(self.path)
            moved = (stat.st_dev, stat.st_ino) != self._identity
        except OSError:  # gone, or its folder is
            moved = True
        if moved:
            self._discard()
            self._open()

    def _failed(self, exc: Exception) -> None:
        if self._on_failure is not None:
            self._on_failure()
        self._log_failure(exc)

    def _log_failure(self, exc: Exception) -> None:
        self._failures_log.error(
            "audit log %s cannot be written: %s; records are dropped, requests still served",
            self.path,
            exc,
        )


def audit_record(route: Route, body: Mapping[str, Any], with_prompt: bool) -> dict[str, Any]:
    """The audit line of one routing decision."""
    record = {
        "ts": time.time(),
        "request_id": route.request_id,
        "decode_pod": route.decode.pod,
        "decode_reason": route.decode.reason,
        "decode_scores": route.decode.scores,
        "prefill_pod": route.prefill.pod if route.prefill else None,
        "prefill_reason": route.prefill.reason if route.prefill else None,
        "prompt_tokens": route.num_prompt_tokens,
        "hit_tokens": route.hit_tokens,
        # per pod: cached blocks in a row, and how many of them only the shared tier holds
        "cached_blocks": {pod: cache.num_blocks for pod, cache in route.caches.items()},
        "shared_blocks": {
            pod: cache.tiers.count(MEDIUM_SHARED) for pod, cache in route.caches.items()
        },
        "priority": route.request_class.priority,
        "fairness_id": route.request_class.fairness_id,
        "slo_ttft_s": route.request_class.slo.ttft_s,
        "slo_tpot_s": route.request_class.slo.tpot_s,
        "admission": route.admission,
        "queued_s": route.queued_s,
        "predicted_ttft_s": route.prediction.ttft_s if route.prediction else None,
        "predicted_tpot_s": route.prediction.tpot_s if route.prediction else None,
        "loads": {
            pod: {
                "waiting": load.num_waiting,
                "running": load.num_running,
                "kv_usage": load.kv_usage,
                "in_flight": load.num_in_flight,
            }
            for pod, load in route.loads.items()
        },
    }
    if with_prompt:
        record["prompt"] = body.get("prompt", body.get("messages"))
    return record
