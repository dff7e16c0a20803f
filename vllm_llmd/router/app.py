"""The router's aiohttp application: its routes, and the start-up and clean-up of a `Router`
(the upstream session, the pod registry's polling)."""

from __future__ import annotations

from aiohttp import web

from vllm_llmd.router.proxy import Router
from vllm_llmd.router.upstream import upstream_session


def make_app(router: Router) -> web.Application:
    """The app serving `router`: the OpenAI endpoints, /v1/models, /health and /metrics."""
    app = web.Application(client_max_size=router.config.max_body_bytes)
    app.router.add_post("/v1/completions", router.handle_generate)
    app.router.add_post("/v1/chat/completions", router.handle_generate)
    app.router.add_get("/v1/models", router.handle_models)
    app.router.add_get("/health", router.handle_health)
    app.router.add_get("/metrics", router.handle_metrics)

    async def on_startup(app: web.Application) -> None:
        router.session = upstream_session(router.config.request_timeout_s)
        await router.registry.start(router.session)

    async def on_cleanup(app: web.Application) -> None:
        if router.replicator is not None:
            await router.replicator.stop()
        await router.registry.stop()
        if router.session is not None:
            await router.session.close()
        router.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app
