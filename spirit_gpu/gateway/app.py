"""create_app: the whole gateway as one aiohttp Application."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from spirit_gpu.gateway import (
    agent_api,
    link_server,
    ops_routes,
    public_api,
    stream_route,
)
from spirit_gpu.gateway.config import CONFIG_KEY, GatewayConfig
from spirit_gpu.gateway.httpio import error_middleware
from spirit_gpu.gateway.metrics import GatewayMetrics
from spirit_gpu.gateway.proxy import route as proxy_route
from spirit_gpu.gateway.service import GATEWAY_KEY, Gateway
from spirit_gpu.gateway.storage.base import Storage
from spirit_gpu.gateway.storage.memory import MemoryStorage


def default_storage(config: GatewayConfig) -> Storage:
    return MemoryStorage(lease_seconds=config.lease_seconds,
                         retention_seconds=config.result_retention,
                         max_deliveries=config.max_deliveries,
                         max_chunk_bytes=config.max_result_bytes_sync)


def create_app(config: GatewayConfig, storage: Storage | None = None) -> web.Application:
    """The gateway app. ``app[CONFIG_KEY]`` is the config, ``app[GATEWAY_KEY]`` the core."""
    # Bodies are read (and bounded) by the handlers themselves, as they stream in.
    app = web.Application(middlewares=[error_middleware], client_max_size=1024**3)
    app[CONFIG_KEY] = config
    gateway = Gateway(config, storage or default_storage(config),
                      GatewayMetrics(config.metrics_max_sids))
    app[GATEWAY_KEY] = gateway

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        await gateway.start()
        yield
        await gateway.close()

    app.cleanup_ctx.append(lifecycle)
    public_api.install(app)
    stream_route.install(app)
    agent_api.install(app)
    link_server.install(app)
    ops_routes.install(app)
    proxy_route.install(app, config)
    return app
