"""Decode a KVEventBatch payload (msgpack) into our domain events, leniently.

The batch is positional, `[ts, [events...], data_parallel_rank]` (older engines omit the rank).
Each event comes in one of two forms:

- current vLLM: a map tagged with its class, `{"type": "BlockStored", "block_hashes": [...], ...}`,
  with fields equal to their default left out;
- older vLLM: a tagged array, `["BlockStored", block_hashes, parent_block_hash, ...]`, fields in
  declaration order (`_POSITIONAL_FIELDS`), later fields possibly missing.

Both become one keyword map that `msgspec.convert` checks against `model.py`'s types. Unknown
keys and extra trailing positions are ignored, so fields a newer vLLM adds do not break us. An
event that still does not fit is counted in the batch (`num_malformed`), never raised: one bad
event must not cost a router the rest of the step. Only a payload that is not a batch at all
raises `MalformedBatchError`.
"""

from __future__ import annotations

from typing import Any

import msgspec

from vllm_llmd.events.model import AllBlocksCleared, BlockRemoved, BlockStored, Event, EventBatch
from vllm_llmd.hashing import event_hash_from_wire

_EVENT_TYPES: dict[str, type[Event]] = {
    "BlockStored": BlockStored,
    "BlockRemoved": BlockRemoved,
    "AllBlocksCleared": AllBlocksCleared,
}

# Field order of the array form: vLLM's declaration order (it only ever appended fields).
_POSITIONAL_FIELDS: dict[str, tuple[str, ...]] = {
    "BlockStored": (
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
        "extra_keys",
        "group_idx",
        "kv_cache_spec_kind",
        "kv_cache_spec_sliding_window",
        "locality",
        "ownership",
        "session_id",
        "lookahead_token_ids",
    ),
    "BlockRemoved": ("block_hashes", "medium", "group_idx", "locality", "ownership"),
    "AllBlocksCleared": (),
}


class MalformedBatchError(ValueError):
    """The payload is not a KVEventBatch (not msgpack, or not `[ts, [events...], ...]`)."""


class MalformedEventError(ValueError):
    """An event that is tagged wrongly or whose fields do not fit its type."""


class UnknownEventError(ValueError):
    """An event of a type this decoder does not know (a newer vLLM's)."""


def decode_batch(payload: bytes) -> EventBatch:
    """Decode one published payload; malformed and unknown events are counted and skipped."""
    try:
        raw = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError as exc:
        raise MalformedBatchError(f"payload is not msgpack: {exc}") from None
    except RecursionError:  # msgspec's own depth guard: a hostile or broken publisher
        raise MalformedBatchError("payload is nested too deeply to be a batch") from None
    if not isinstance(raw, list) or len(raw) < 2:
        raise MalformedBatchError(f"expected [ts, [events...], dp_rank], got {_preview(raw)}")
    ts, raw_events, *rest = raw
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not isinstance(raw_events, list):
        raise MalformedBatchError(f"expected [ts, [events...], dp_rank], got {_preview(raw)}")
    dp_rank = rest[0] if rest and isinstance(rest[0], int) else None

    events: list[Event] = []
    num_malformed = num_unknown = 0
    for raw_event in raw_events:
        try:
            events.append(decode_event(raw_event))
        except UnknownEventError:
            num_unknown += 1
        except (MalformedEventError, RecursionError):
            num_malformed += 1
    return EventBatch(
        ts=float(ts),
        events=tuple(events),
        data_parallel_rank=dp_rank,
        num_malformed=num_malformed,
        num_unknown=num_unknown,
    )


def decode_event(raw: Any) -> Event:
    """One already-unpacked event (tagged map or tagged array) as a domain event.

    Raises UnknownEventError or MalformedEventError; `decode_batch` counts those instead.
    """
    tag, fields = _as_fields(raw)
    event_type = _EVENT_TYPES.get(tag)
    if event_type is None:
        raise UnknownEventError(f"unknown event type {tag!r}")
    try:
        _normalize_hashes(fields)
        return msgspec.convert(fields, event_type)
    except (msgspec.ValidationError, TypeError, ValueError, RecursionError) as exc:
        raise MalformedEventError(f"malformed {tag}: {exc}") from None


def _as_fields(raw: Any) -> tuple[str, dict[Any, Any]]:
    if isinstance(raw, dict):
        tag = raw.get("type")
        if isinstance(tag, str):
            return tag, raw
    elif isinstance(raw, list) and raw and isinstance(raw[0], str):
        tag = raw[0]
        # zip stops at the shorter side: extra trailing values and missing ones are both fine
        return tag, dict(zip(_POSITIONAL_FIELDS.get(tag, ()), raw[1:], strict=False))
    raise MalformedEventError(f"not a tagged event: {_preview(raw)}")


def _normalize_hashes(fields: dict[Any, Any]) -> None:
    # Engines send ints by default and raw digests with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0;
    # consumers key on one form.
    hashes = fields.get("block_hashes")
    if isinstance(hashes, list):
        fields["block_hashes"] = [event_hash_from_wire(h) for h in hashes]
    parent = fields.get("parent_block_hash")
    if parent is not None:
        fields["parent_block_hash"] = event_hash_from_wire(parent)


def _preview(value: Any, limit: int = 80) -> str:
    try:
        text = repr(value)
    except RecursionError:
        return f"a {type(value).__name__} nested too deeply to show"
    return text if len(text) <= limit else text[:limit] + "..."
