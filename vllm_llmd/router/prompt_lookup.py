"""What each pod holds of a request's prompt (`PromptLookup`), for `decision.Decider`:

    tokenize -> vLLM's block hashes (off the event loop) -> the index's cached run per pod (off
    the event loop) -> with the prefixes just routed there (`RecentRoutes`) -> with the shared
    tier's run (`SharedTierView`)

A tokenization or index lookup that fails or takes too long gives nothing (the request is
routed by load alone, counted in llmd:router_routing_fallbacks_total), never an error.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from typing import Any

from vllm_llmd.events.model import MEDIUM_GPU
from vllm_llmd.log import ThrottledLog
from vllm_llmd.router.config import RouterConfig
from vllm_llmd.router.index import Index
from vllm_llmd.router.metrics import RouterMetrics
from vllm_llmd.router.off_loop import OffLoop
from vllm_llmd.router.pods import PodRegistry
from vllm_llmd.router.recent import RecentRoutes
from vllm_llmd.router.scoring import PodCache
from vllm_llmd.router.shared_view import SharedTierView, extend_with_shared, extended
from vllm_llmd.router.tokens import TokenProcessor, UnsupportedRequestError

logger = logging.getLogger(__name__)

# threads for index and shared-tier calls (Redis round trips; a stalled Redis holds each for
# up to its socket timeout)
INDEX_WORKERS = 4


class PromptLookup:
    """The prompt's block hashes and each pod's cached run of them."""

    def __init__(
        self,
        config: RouterConfig,
        registry: PodRegistry,
        index: Index | None,
        tokens: TokenProcessor | None,
        metrics: RouterMetrics,
        shared: SharedTierView | None = None,
    ) -> None:
        self.registry = registry
        self.index = index
        self.tokens = tokens
        self.shared = shared
        self.metrics = metrics
        ttl = config.recent_route_ttl_s
        # prefixes routed to a pod whose KV events are not in yet
        self.recent = RecentRoutes(ttl) if ttl > 0 else None
        self.tokenize_calls = OffLoop(
            "llmd-tokenize", config.tokenize_workers, config.tokenize_timeout_s
        )
        self.index_calls = OffLoop("llmd-index", INDEX_WORKERS, config.index_timeout_s)
        # a tokenizer or index that keeps failing must not log once per request
        self._tokenize_log, self._index_log = ThrottledLog(logger), ThrottledLog(logger)

    async def hashes(self, path: str, body: Mapping[str, Any]) -> tuple[list[int], int | None]:
        """The prompt's block hashes and token count, tokenized off the event loop; none (the
        request is routed by load) when it cannot be tokenized here or takes too long."""
        if self.tokens is None:
            return [], None
        try:
            tokenized = await self.tokenize_calls.run(self.tokens.tokenize_request, path, body)
        except UnsupportedRequestError as exc:
            logger.debug("routing by load alone: %s", exc)
            return [], None
        except TimeoutError:
            self.metrics.routing_fallbacks.labels("tokenize_timeout").inc()
            self._tokenize_log.warning(
                "tokenizing a request took over %g s: routed by load alone",
                self.tokenize_calls.timeout_s,
            )
            return [], None
        return list(tokenized.block_hashes), len(tokenized.token_ids)

    async def lookup(self, hashes: list[int]) -> dict[str, PodCache] | None:
        """`_caches` off the event loop; None (route by load) when the index fails or stalls."""
        if self.index is None or not hashes:
            return {}
        try:
            caches = await self.index_calls.run(self._caches, hashes)
        except Exception as exc:  # Redis down or stalled, or a bug: never a failed request
            reason = "index_timeout" if isinstance(exc, TimeoutError) else "index_error"
            self.metrics.routing_fallbacks.labels(reason).inc()
            self._index_log.warning("index lookup failed (%r): routed by load alone", exc)
            return None
        return caches

    def now(
        self, looked_up: Mapping[str, PodCache] | None, hashes: list[int]
    ) -> dict[str, PodCache]:
        """The caches to decide on: the lookup's (none when it failed: by load), with what
        was routed since. The lookup ran off the event loop, so requests that arrived
        together were all looked up before the first of them was routed; without the routes
        since, those on one prefix spread over pods, each computing it (8 clients starting
        at once on six documents: every first request was routed cold)."""
        if looked_up is None:
            return {}
        return self._with_recent(looked_up, hashes, set(self.registry.hash_verified()))

    def routed(self, pod: str, hashes: list[int]) -> None:
        """The prompt went to `pod`: its prefix counts as there until the pod's events say."""
        if self.recent is not None and hashes:
            self.recent.record(pod, hashes)

    def close(self) -> None:
        self.tokenize_calls.close()
        self.index_calls.close()
        if self.index is not None:
            self.index.close()
        if self.shared is not None:
            self.shared.close()

    def _caches(self, hashes: list[int]) -> dict[str, PodCache]:
        """Each verified pod's cached run of the prompt: the index, prefixes just routed there,
        then the shared tier. Blocking (Redis): call it through `lookup`."""
        verified = self.registry.hash_verified()  # a pod whose hashes differ has no prefix here
        if self.index is None or not hashes or not verified:
            return {}
        hits = self.index.lookup_prefix(hashes, pods=verified)
        caches = {pod: PodCache(hit.num_blocks, hit.tiers) for pod, hit in hits.items()}
        caches = self._with_recent(caches, hashes, verified)
        if self.shared is None or not (members := self.shared.members().intersection(verified)):
            return caches
        return extend_with_shared(caches, members, self.shared.run_length(hashes))

    def _with_recent(
        self, caches: Mapping[str, PodCache], hashes: list[int], pods: Collection[str]
    ) -> dict[str, PodCache]:
        """`caches` with the prefixes routed to `pods` whose events are not in yet (in the
        lookup, and again at the decision: `now`)."""
        out = dict(caches)
        if self.recent is None or self.index is None or not hashes:
            return out
        for pod, run in self.recent.runs(hashes).items():
            if pod in pods:
                out[pod] = extended(out.get(pod) or PodCache(), run, MEDIUM_GPU)
        return out
