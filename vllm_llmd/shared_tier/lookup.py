"""`SharedLookup`: one request's lookup on the LMCache server, as its `RequestState` holds it.

Its own module so that the request state (`vllm_llmd.connector.request_state`) can name the
type without importing the planner that creates it (which names the request state).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class SharedLookup:
    """One request's lookup on the server."""

    end: int  # tokens looked up: the prompt's full chunks
    sent_at: float
    future: Any  # the RPC in flight (lookup, then query_prefetch_status)
    querying: bool = False
    # hit tokens from 0 once known
    hit: int | None = None
    # the server holds read locks on the hit chunks for this request
    locked: bool = False
