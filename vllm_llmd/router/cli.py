"""`vllm-llmd-router`: build the router from flags and serve it."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import cast

from aiohttp import web

from vllm_llmd.events.transport import Transport
from vllm_llmd.router.app import make_app
from vllm_llmd.router.config import RouterConfig, parse_config
from vllm_llmd.router.index import Index, InMemoryIndex
from vllm_llmd.router.ingest import EventIngestor
from vllm_llmd.router.k8s import K8sDiscovery, K8sDiscoveryError
from vllm_llmd.router.metrics import RouterMetrics
from vllm_llmd.router.pods import PodRegistry
from vllm_llmd.router.proxy import Router
from vllm_llmd.router.scoring import make_policy
from vllm_llmd.router.shared_view import InMemorySharedView, RedisSharedView, SharedTierView
from vllm_llmd.router.tokens import TokenProcessor

logger = logging.getLogger("vllm_llmd.router")

PREFIX_POLICIES = ("prefix", "kv_aware", "slo")


def build_router(config: RouterConfig) -> Router:
    """Wire index, ingestion, tokens, pods and policy from a config."""
    index: Index | None = None
    shared: SharedTierView | None = None
    ingestor = None
    tokens = None
    if config.tokenizer:
        tokens = TokenProcessor(
            config.tokenizer, config.block_size, config.hash_algorithm, config.hash_seed
        )
        if config.redis_url:
            from vllm_llmd.router.redis_index import RedisIndex

            timeout_s = config.redis_timeout_s
            index = RedisIndex(
                config.redis_url, connect_timeout_s=timeout_s, socket_timeout_s=timeout_s
            )
            shared = RedisSharedView(
                config.redis_url,
                ttl_s=config.shared_tier_ttl_s,
                connect_timeout_s=timeout_s,
                socket_timeout_s=timeout_s,
            )
        else:
            index = InMemoryIndex(config.index_max_entries)
            shared = InMemorySharedView(config.shared_tier_ttl_s, config.index_max_entries)
        if not config.no_ingest:  # followers read a shared index another replica fills
            ingestor = EventIngestor(
                index, shared=shared, transport=cast(Transport, config.kv_events_transport)
            )
    elif config.policy in PREFIX_POLICIES:
        # Refuse to pretend: without the model's tokenizer no prefix can be matched.
        logger.error("policy %s needs --tokenizer: routing by load alone", config.policy)
    registry = PodRegistry(
        config.pods,
        ingestor,
        config.events_topic,
        config.poll_interval_s,
        tokens,
        health_timeout_s=config.health_timeout_s,
        slow_checks_to_evict=config.health_timeouts_to_evict,
    )
    policy = make_policy(config.policy, config.scoring_config())
    return Router(config, registry, index, tokens, policy, RouterMetrics(), shared=shared)


def build_app(config: RouterConfig) -> web.Application:
    """The router's web app; with --k8s-label-selector, its pods are also discovered.

    Raises:
        K8sDiscoveryError: discovery was asked for but cannot start (no client, no credentials).
    """
    discovery = K8sDiscovery.from_config(config) if config.k8s_label_selector else None
    router = build_router(config)
    app = make_app(router)
    if discovery is not None:
        # After make_app's start-up hook (the registry polls), before its clean-up (it stops).
        async def start_discovery(app: web.Application) -> None:
            await discovery.start(router.registry)

        async def stop_discovery(app: web.Application) -> None:
            await discovery.stop()

        app.on_startup.append(start_discovery)
        app.on_shutdown.append(stop_discovery)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `vllm-llmd-router` console script."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = parse_config(argv)
    try:
        app = build_app(config)
    # ConnectionError: Redis unreachable; FileNotFoundError: --tokenizer is no local model folder
    except (K8sDiscoveryError, ConnectionError, FileNotFoundError) as exc:
        sys.exit(f"vllm-llmd-router: error: {exc}")
    logger.info(
        "vllm-llmd-router on http://%s:%d, policy %s, %d pods%s",
        config.host,
        config.port,
        config.policy,
        len(config.pods),
        f" + pods labelled {config.k8s_label_selector}" if config.k8s_label_selector else "",
    )
    # handler_cancellation: a client that disconnects cancels its request here, and so upstream
    # (the pod aborts it) instead of the pod generating an answer no one reads, or the request
    # waiting in the admission queue and being dispatched after its client left.
    web.run_app(app, host=config.host, port=config.port, print=None, handler_cancellation=True)


if __name__ == "__main__":
    main()
