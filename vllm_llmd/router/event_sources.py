"""A pod's KV-event endpoints, from vLLM's `GET /kv_event_sources`.

vLLM answers `{dp_rank: {"enable_kv_cache_events": bool, "endpoint": str, "replay_endpoint":
str, ...}}` with bind addresses (`tcp://*:5557`); we read DP rank 0 (or the first rank) and
connect to the pod's host instead. Anything else is a bad answer from the pod
(`BadEventSources`, naming the field), never an exception of another type: the caller routes
that pod by load alone.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import aiohttp


class BadEventSources(ValueError):
    """A pod's /kv_event_sources answer is not in vLLM's format; the message says what."""


async def discover_event_endpoints(
    session: aiohttp.ClientSession, url: str
) -> tuple[str | None, str | None]:
    """The pod's (event, replay) endpoints from vLLM's GET /kv_event_sources (DP rank 0).

    (None, None) when the pod has none (no such route, events off, unreachable).

    Raises:
        BadEventSources: the answer is not the object vLLM sends.
    """
    try:
        async with session.get(
            url + "/kv_event_sources", timeout=aiohttp.ClientTimeout(total=2), allow_redirects=False
        ) as resp:
            if resp.status != 200:
                return None, None
            sources = await resp.json()
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return None, None
    except RecursionError:  # json's depth guard
        raise BadEventSources("/kv_event_sources answered JSON nested too deeply") from None
    if sources is None or sources == {}:
        return None, None
    if not isinstance(sources, dict):
        raise BadEventSources(
            f"/kv_event_sources answered {_kind(sources)}, not an object of DP rank -> config"
        )
    key = "0" if "0" in sources else next(iter(sources))
    config = sources[key]
    if not isinstance(config, dict):
        raise BadEventSources(f"/kv_event_sources[{key!r}] is {_kind(config)}, not an object")
    if not config.get("enable_kv_cache_events"):
        return None, None
    host = urlsplit(url).hostname or "127.0.0.1"
    endpoints = []
    for field_name in ("endpoint", "replay_endpoint"):
        value = config.get(field_name)
        if value is not None and not isinstance(value, str):
            raise BadEventSources(
                f"/kv_event_sources[{key!r}].{field_name} is {_kind(value)}, not a string"
            )
        endpoints.append(_connectable(value, host))
    return endpoints[0], endpoints[1]


def _kind(value: object) -> str:
    """What a JSON value is, for an error message (its JSON type, and a short preview)."""
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    kind = kinds.get(type(value), "a number" if isinstance(value, (int, float)) else "null")
    text = repr(value)
    return f"{kind} ({text[:60] + '...' if len(text) > 60 else text})"


def _connectable(endpoint: str | None, host: str) -> str | None:
    """vLLM reports bind addresses (tcp://*:5557): connect to the pod's host instead."""
    if not endpoint:
        return None
    for wildcard in ("*", "0.0.0.0", "[::]"):
        endpoint = endpoint.replace(f"//{wildcard}:", f"//{host}:")
    return endpoint
