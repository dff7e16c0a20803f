"""The audit log: one JSON line per routing decision (`--audit-log`).

Auditing must never cost a request: a record that cannot be written (disk full, the file or its
folder gone, no permission) is dropped, counted, and logged at most once per
`FAILURE_LOG_INTERVAL_S`; the request is served. The file is reopened when it was removed or
replaced (rotation), as logging's WatchedFileHandler does, so records go where the path points.

A record is written when its request's answer is complete (before its last byte reaches the
client, so a client that read the answer finds the line), or when the request failed after it
was routed; requests refused before routing (400, 401, 403, 503 with no pod) have none.
Format version 2 (`"v": 2`):

    v, ts (arrival, Unix time), request_id, path, model, stream, status (HTTP; 499: the client
    left first), ttft_s (arrival to the first byte of a streamed 200 answer, else null),
    latency_s, kind ("direct" or "pd"),
    direct: pod, reason, scores
    pd:     prefill_pod, prefill_reason, prefill_scores, decode_pod, decode_reason,
            decode_scores, prefilled (false: the prefill failed and the decode pod ran alone),
            prefill_s (sending the prefill step to its answer; null when none came)
    served_pod (whose answer was relayed: differs from the chosen pod after a failed connect;
    null when none answered), prompt_tokens, hit_tokens, cached_blocks, shared_blocks,
    priority, fairness_id, slo_ttft_s, slo_tpot_s, admission, queued_s (the wait in the
    router's queue), routed_s (arrival to the routing decision: tokenizing, cache lookup and
    the queue; ts + routed_s is when the request was dispatched), predicted_ttft_s,
    predicted_tpot_s, shape (what the decode pod's latency model read at dispatch:
    uncached_tokens, cached_tokens, host_tokens and storage_tokens: those of the cached ones
    held only in host memory, and on disk or in the shared tier, ahead_tokens, ahead_elapsed_s,
    active; a P/D route's as its decode request went, after the prefill: the prompt counted
    as cached tokens, ahead_elapsed_s that much further on), loads (per pod:
    waiting, running, kv_usage, in_flight, held_blocks: the KV blocks the router's requests
    in flight hold there, counted with --kv-room, the default, else 0; kv_blocks: its size,
    0 unknown), and prompt with --audit-prompts.

Version 1 (no "v") had no path, model, stream, status, ttft_s, latency_s, kind or served_pod,
and named every route's pod `decode_pod`; `shape` was added to version 2 later (a reader
ignores a key it does not know). `vllm-llmd-router audit summarize` reads both.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any

from vllm_llmd.events.model import MEDIUM_SHARED
from vllm_llmd.log import ThrottledLog
from vllm_llmd.router.routing import Route

logger = logging.getLogger(__name__)

FAILURE_LOG_INTERVAL_S = 60.0
# the audit line's format ("v"); see the module docstring
AUDIT_VERSION = 2


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


@dataclass(frozen=True)
class Outcome:
    """How a routed request ended, for its audit line."""

    path: str
    # time.time() when the request arrived
    arrived: float
    # the answer's HTTP status (499: the client left first)
    status: int
    # arrival to the answer's first byte, for a streamed 200 answer (None otherwise)
    ttft_s: float | None
    # arrival to the end of the answer (or to the failure)
    latency_s: float
    # arrival to the routing decision: tokenizing, cache lookup and the wait in the queue
    routed_s: float | None
    # the pod whose answer was relayed: the chosen one, or the next-best after a failed
    # connect; None when no pod answered
    served_pod: str | None
    # a P/D route's prefill ran and its KV went to the decode pod (False: decoded alone)
    prefilled: bool
    # seconds the prefill step took to answer (None: none answered, or no P/D)
    prefill_s: float | None = None


def audit_record(
    route: Route, body: Mapping[str, Any], with_prompt: bool, outcome: Outcome
) -> dict[str, Any]:
    """The audit line of one routed request (format `AUDIT_VERSION`, see the module docstring)."""
    record: dict[str, Any] = {
        "v": AUDIT_VERSION,
        "ts": outcome.arrived,
        "request_id": route.request_id,
        "path": outcome.path,
        "model": body.get("model"),
        "stream": bool(body.get("stream")),
        "status": outcome.status,
        "ttft_s": outcome.ttft_s,
        "latency_s": outcome.latency_s,
        "kind": "pd" if route.prefill else "direct",
    }
    if route.prefill is None:
        record["pod"] = route.decode.pod
        record["reason"] = route.decode.reason
        record["scores"] = route.decode.scores
    else:
        record["prefill_pod"] = route.prefill.pod
        record["prefill_reason"] = route.prefill.reason
        record["prefill_scores"] = route.prefill.scores
        record["decode_pod"] = route.decode.pod
        record["decode_reason"] = route.decode.reason
        record["decode_scores"] = route.decode.scores
        record["prefilled"] = outcome.prefilled
        record["prefill_s"] = outcome.prefill_s
    record.update(
        {
            "served_pod": outcome.served_pod,
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
            "routed_s": outcome.routed_s,
            "predicted_ttft_s": route.prediction.ttft_s if route.prediction else None,
            "predicted_tpot_s": route.prediction.tpot_s if route.prediction else None,
            "shape": {
                "uncached_tokens": route.shape.uncached_tokens,
                "cached_tokens": route.shape.cached_tokens,
                "host_tokens": route.shape.host_tokens,
                "storage_tokens": route.shape.storage_tokens,
                "ahead_tokens": route.shape.ahead_tokens,
                "ahead_elapsed_s": route.shape.ahead_elapsed_s,
                "active": route.shape.active,
            },
            "loads": {
                pod: {
                    "waiting": load.num_waiting,
                    "running": load.num_running,
                    "kv_usage": load.kv_usage,
                    "in_flight": load.num_in_flight,
                    "held_blocks": load.held_blocks,
                    "kv_blocks": load.kv_blocks,
                }
                for pod, load in route.loads.items()
            },
        }
    )
    if with_prompt:
        record["prompt"] = body.get("prompt", body.get("messages"))
    return record
