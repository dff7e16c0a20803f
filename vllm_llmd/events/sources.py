"""A pod's KV-event endpoints, from vLLM's `GET /kv_event_sources`.

vLLM answers `{dp_rank: {"enable_kv_cache_events": bool, "endpoint": str, "replay_endpoint":
str, ...}}` with bind addresses (`tcp://*:5557`); we read DP rank 0 (or the first rank) and
connect to the pod's host instead. Anything else is a bad answer from the pod
(`BadEventSources`, naming the field), never an exception of another type.

Two callers: the router (`discover_event_endpoints`: a pod without events is routed by load
alone, so "none" is an answer) and the events watcher (`event_endpoints`: "none" is an error
whose message says why, `NoEventSources`). Here rather than in the router so that the watcher
needs no router code.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import aiohttp


class BadEventSources(ValueError):
    """A pod's /kv_event_sources answer is not in vLLM's format; the message says what."""


class NoEventSources(Exception):
    """A pod gave no event endpoint (unreachable, no such route, events off); says which."""


async def discover_event_endpoints(
    session: aiohttp.ClientSession, url: str
) -> tuple[str | None, str | None]:
    """The pod's (event, replay) endpoints from vLLM's GET /kv_event_sources (DP rank 0).

    (None, None) when the pod has none (no such route, events off, unreachable).

    Raises:
        BadEventSources: the answer is not the object vLLM sends.
    """
    try:
        return await event_endpoints(session, url)
    except NoEventSources:
        return None, None


async def event_endpoints(
    session: aiohttp.ClientSession, url: str
) -> tuple[str | None, str | None]:
    """`discover_event_endpoints`, but a pod with none says why.

    Raises:
        NoEventSources: unreachable, not 200, no answer in time, not JSON, or events off.
        BadEventSources: the answer is not the object vLLM sends.
    """
    where = url + "/kv_event_sources"
    try:
        async with session.get(
            where, timeout=aiohttp.ClientTimeout(total=2), allow_redirects=False
        ) as resp:
            if resp.status != 200:
                raise NoEventSources(f"GET {where} answered HTTP {resp.status}")
            sources = await resp.json()
    except aiohttp.ClientError as exc:
        raise NoEventSources(f"GET {where} failed: {str(exc) or type(exc).__name__}") from None
    except asyncio.TimeoutError:
        raise NoEventSources(f"GET {where} got no answer in 2 s") from None
    except ValueError as exc:
        raise NoEventSources(f"GET {where} answered no JSON ({exc})") from None
    except RecursionError:  # json's depth guard
        raise BadEventSources("/kv_event_sources answered JSON nested too deeply") from None
    if sources is None or sources == {}:
        raise NoEventSources(f"GET {where} lists no event sources (KV events are off)")
    if not isinstance(sources, dict):
        raise BadEventSources(
            f"/kv_event_sources answered {_kind(sources)}, not an object of DP rank -> config"
        )
    key = "0" if "0" in sources else next(iter(sources))
    config = sources[key]
    if not isinstance(config, dict):
        raise BadEventSources(f"/kv_event_sources[{key!r}] is {_kind(config)}, not an object")
    if not config.get("enable_kv_cache_events"):
        raise NoEventSources(
            f"GET {where}: enable_kv_cache_events is off (vLLM's --kv-events-config)"
        )
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
