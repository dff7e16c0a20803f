"""Whether a pod tokenizes and hashes as the router does: probed over HTTP, or checked
against a `BlockStored` event the pod published. The router must not route on cache affinity to
a pod that fails them (`pods.PodRegistry` routes it by load alone)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from vllm_llmd.hashing import PrefixHasher, short_hash
from vllm_llmd.prometheus_text import parse_prometheus_text
from vllm_llmd.router.chat_template import UnsupportedRequestError

# Probe inputs for verify_against_pod: mixed scripts, digits, runs of spaces, punctuation.
PROBE_TEXT = (
    "Routing probe: the quick brown fox jumps over 13 lazy dogs... twice!\n"
    "  Indented line\twith a tab, an accent (déjà vu), 漢字 and an emoji 🦊."
)
PROBE_MESSAGES = (
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": PROBE_TEXT},
)


@dataclass(frozen=True, slots=True)
class HashVerification:
    """Whether this router's tokens and hashes match a pod's, and if not, why."""

    ok: bool
    reason: str
    # the pod's block size and hash algorithm from vllm:cache_config_info (None: not exposed)
    pod_block_size: int | None = None
    pod_hash_algorithm: str | None = None


logger = logging.getLogger(__name__)


class ProbeTokenizer(Protocol):
    """What a probe needs of the router's tokenizer (`tokens.TokenProcessor`)."""

    hasher: PrefixHasher

    @property
    def block_size(self) -> int: ...

    @property
    def settings_known(self) -> bool: ...

    def adopt_pod_settings(self, block_size: int | None, algorithm: str | None) -> list[str]: ...

    def completion_token_ids(self, prompt: str) -> list[int]: ...

    def chat_token_ids(self, messages: Sequence[Any]) -> list[int]: ...


def verify_stored_event(
    hasher: PrefixHasher, token_ids: Sequence[int], block_hashes: Sequence[int], block_size: int
) -> HashVerification:
    """Recompute the hashes of a prefix-start `BlockStored` (parent None, no extra keys)."""
    if block_size != hasher.block_size:
        return HashVerification(
            False, f"the pod hashes blocks of {block_size} tokens, the router {hasher.block_size}"
        )
    ours = hasher.event_hashes(list(token_ids))
    if list(block_hashes) != ours:
        return HashVerification(
            False,
            f"block hashes differ (pod {' '.join(map(short_hash, list(block_hashes)[:2]))}..., "
            f"router {' '.join(map(short_hash, ours[:2]))}...): "
            f"the pods' --prefix-caching-hash-algo or PYTHONHASHSEED differs from "
            f"the router's ({hasher.algorithm})",
        )
    return HashVerification(True, f"{len(ours)} block hashes match")


async def verify_against_pod(
    processor: ProbeTokenizer,
    pod_url: str,
    model: str,
    *,
    session: Any = None,
    timeout: float = 10.0,
) -> HashVerification:
    """Probe a pod: its /tokenize (completion and chat) and its block size and algorithm.

    The router's own tokenization of the probes runs off the event loop. The hash seed cannot
    be read over HTTP: check it with `verify_stored_event` on the pod's first prefix-start
    BlockStored.

    Args:
        processor: the router's tokenizer.
        pod_url: the pod's base URL, e.g. "http://10.0.0.5:8000".
        model: the served model name.
        session: an aiohttp.ClientSession to reuse (one is made if None).
        timeout: seconds for each HTTP call.
    """
    import aiohttp

    if session is None:
        async with aiohttp.ClientSession() as own:
            return await verify_against_pod(processor, pod_url, model, session=own, timeout=timeout)
    url = pod_url.rstrip("/")
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    try:
        completion = await _post_tokenize(
            session, url, {"model": model, "prompt": PROBE_TEXT}, client_timeout
        )
        try:
            chat = await _post_tokenize(
                session, url, {"model": model, "messages": list(PROBE_MESSAGES)}, client_timeout
            )
        except _RejectedProbe:  # a base model without a chat template: fine if ours has none
            chat = None
        async with session.get(
            url + "/metrics", timeout=client_timeout, allow_redirects=False
        ) as response:
            response.raise_for_status()
            metrics = await response.text()
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        return HashVerification(False, f"could not probe {url}: {exc!r}")
    block_size, algorithm = cache_config_info(metrics)
    try:
        taken = processor.adopt_pod_settings(block_size, algorithm)
    except ValueError as exc:  # a hash algorithm the router lacks
        return HashVerification(False, f"cannot hash as the pod does: {exc}", block_size, algorithm)
    if taken:
        logger.info("took %s from pod %s (vllm:cache_config_info)", " and ".join(taken), url)
    our_completion, our_chat = await asyncio.to_thread(_probe_tokens, processor)
    problems = [
        f"{what} tokens differ: {_first_difference(ours, theirs)}"
        for what, ours, theirs in (
            ("completion", our_completion, completion),
            ("chat", our_chat, chat),
        )
        if ours != theirs
    ]
    if not processor.settings_known:
        problems.append(
            "the pod does not say its block size (no vllm:cache_config_info): give the router "
            "--block-size"
        )
    elif block_size is not None and block_size != processor.block_size:
        problems.append(
            f"the pod's block size is {block_size}, the router's {processor.block_size}"
        )
    if algorithm is not None and algorithm != processor.hasher.algorithm:
        problems.append(
            f"the pod hashes with {algorithm}, the router with {processor.hasher.algorithm}"
        )
    reason = "; ".join(problems) or "tokens, block size and hash algorithm match"
    return HashVerification(not problems, reason, block_size, algorithm)


def _probe_tokens(processor: ProbeTokenizer) -> tuple[list[int], list[int] | None]:
    """The router's tokens of the probes (completion, chat; None: no chat template)."""
    try:
        chat = processor.chat_token_ids(PROBE_MESSAGES)
    except UnsupportedRequestError:
        chat = None
    return processor.completion_token_ids(PROBE_TEXT), chat


class _RejectedProbe(ValueError):
    """The pod answered the probe with an error status."""


async def _post_tokenize(session: Any, url: str, body: dict[str, Any], timeout: Any) -> list[int]:
    async with session.post(
        url + "/tokenize", json=body, timeout=timeout, allow_redirects=False
    ) as response:
        if response.status != 200:
            raise _RejectedProbe(
                f"/tokenize answered {response.status}: {(await response.text())[:300]}"
            )
        return list((await response.json())["tokens"])


def cache_config_info(metrics_text: str) -> tuple[int | None, str | None]:
    """(block size, prefix-caching hash algorithm) from a pod's `vllm:cache_config_info`."""
    only = ("vllm:cache_config_info",)
    for (name, labels), _ in parse_prometheus_text(metrics_text, only=only).items():
        if name == "vllm:cache_config_info":
            info = dict(labels)
            size = info.get("block_size")
            return (int(size) if size and size.isdigit() else None), info.get(
                "prefix_caching_hash_algo"
            )
    return None, None


def _first_difference(ours: list[int] | None, theirs: list[int] | None) -> str:
    if ours is None or theirs is None:
        return "the " + ("router" if ours is None else "pod") + " has no chat template"
    index = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None)
    if index is None:
        index = min(len(ours), len(theirs))
    return (
        f"first at index {index} of router {len(ours)} / pod {len(theirs)} tokens "
        f"(router {ours[index : index + 4]}, pod {theirs[index : index + 4]})"
    )
