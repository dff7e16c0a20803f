"""`vllm-llmd-router`: build the router from flags and serve it; `vllm-llmd-router check ...`
checks pods instead (`router/check.py`)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any, cast

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_log import AccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from vllm_llmd.events.transport import Transport
from vllm_llmd.router.app import make_app
from vllm_llmd.router.chat_template import load_chat_template
from vllm_llmd.router.config import RouterConfig
from vllm_llmd.router.config_parse import parse_config
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
# requests of probes and scrapers: no access-log line with --access-log requests
PROBE_PATHS = frozenset({"/health", "/metrics"})
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class RequestsAccessLogger(AccessLogger):
    """aiohttp's access log, less the GET /health and GET /metrics of probes and scrapers."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        if request.method == "GET" and request.path in PROBE_PATHS:
            return
        super().log(request, response, time)


def access_log_options(mode: str) -> dict[str, Any]:
    """`web.run_app` / `web.AppRunner` arguments of an --access-log mode."""
    if mode == "off":
        return {"access_log": None}
    access_log_class: type[AbstractAccessLogger] = (
        RequestsAccessLogger if mode == "requests" else AccessLogger
    )
    return {"access_log_class": access_log_class}


def token_processor(config: RouterConfig) -> TokenProcessor | None:
    """The router's tokenizer and hasher (None without --tokenizer).

    Raises:
        FileNotFoundError: --tokenizer is no local model folder.
        ValueError: --chat-template cannot be read or compiled (`parse_config` checked it).
    """
    if not config.tokenizer:
        return None
    template = load_chat_template(config.chat_template) if config.chat_template else None
    return TokenProcessor(
        config.tokenizer,
        config.block_size,
        config.hash_algorithm,
        config.hash_seed,
        chat_template=template,
    )


def build_router(config: RouterConfig) -> Router:
    """Wire index, ingestion, tokens, pods and policy from a config."""
    index: Index | None = None
    shared: SharedTierView | None = None
    ingestor = None
    tokens = token_processor(config)
    if tokens is not None:
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
                index,
                shared=shared,
                transport=cast(Transport, config.kv_events_transport),
                curve=config.kv_events_curve(),
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
    if config.epp_port is not None:
        serve_endpoint_picker(app, router, config.host, config.epp_port)
    return app


def serve_endpoint_picker(app: web.Application, router: Router, host: str, port: int) -> None:
    """Serve the endpoint picker (router/epp.py) beside the app, in its event loop, from its
    start-up (after the registry's first poll) to its shutdown.

    Raises:
        ModuleNotFoundError: the [epp] extra (grpcio, xds-protos) is not installed.
    """
    try:
        from vllm_llmd.router.epp import serve_epp
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"--epp-port needs grpcio and xds-protos (pip install 'vllm-llmd[epp]'): {exc}"
        ) from exc

    servers = []  # the one gRPC server, once started

    async def start(app: web.Application) -> None:
        server, bound = await serve_epp(router, host, port)
        servers.append(server)
        logger.info("endpoint picker (Envoy ext_proc) on %s:%d", host, bound)

    async def stop(app: web.Application) -> None:
        for server in servers:
            await server.stop(grace=1.0)  # streams open past it are cancelled

    app.on_startup.append(start)
    app.on_shutdown.append(stop)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `vllm-llmd-router` console script: serve, `check` pods, or
    `audit summarize` an audit log."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["check"]:
        from vllm_llmd.router.check import main as check_main

        sys.exit(check_main(args[1:]))
    if args[:2] == ["audit", "summarize"]:
        from vllm_llmd.router.audit_summary import main as summarize

        sys.exit(summarize(args[2:]))
    config = parse_config(args)
    logging.basicConfig(level=config.log_level, format=LOG_FORMAT)
    try:
        app = build_app(config)
    # ConnectionError: Redis unreachable; FileNotFoundError: --tokenizer is no local model folder
    # ModuleNotFoundError: --epp-port without the [epp] extra
    except (K8sDiscoveryError, ConnectionError, FileNotFoundError, ModuleNotFoundError) as exc:
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
    web.run_app(
        app,
        host=config.host,
        port=config.port,
        print=None,
        handler_cancellation=True,
        **access_log_options(config.access_log),
    )


if __name__ == "__main__":
    main()
