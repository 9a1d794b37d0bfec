"""create_app: the whole gateway as one aiohttp Application."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

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
from spirit_gpu.gateway.storage.base import Storage, StorageRefused
from spirit_gpu.gateway.storage.memory import MemoryStorage

if TYPE_CHECKING:
    from spirit_gpu.gateway.storage.nats.proxy_share import ProxyShare


def default_storage(config: GatewayConfig) -> Storage:
    """The store ``config.store`` names: memory, or NATS JetStream (the ``nats`` extra)."""
    if config.store.strip() not in ("", "memory"):
        from spirit_gpu.extras import require

        require("nats", "--store nats://...")
        from spirit_gpu.gateway.storage.nats import NatsStorage
        from spirit_gpu.gateway.storage.nats.server import parse_urls

        try:
            urls = parse_urls(config.store)
        except StorageRefused as exc:
            raise _refused(exc) from None
        return NatsStorage(urls, lease_seconds=config.lease_seconds,
                           retention_seconds=config.result_retention,
                           max_deliveries=config.max_deliveries,
                           ttl_max_seconds=config.async_ttl_max,
                           replicas=config.store_replicas,
                           max_chunk_bytes=config.max_result_bytes_sync)
    return MemoryStorage(lease_seconds=config.lease_seconds,
                         retention_seconds=config.result_retention,
                         max_deliveries=config.max_deliveries,
                         max_chunk_bytes=config.max_result_bytes_sync)


def _refused(exc: StorageRefused) -> Exception:
    """The CLI's one-line refusal (``ConfigRefused``) for a store that cannot start."""
    from spirit_gpu.gateway.server import ConfigRefused  # (server imports this module)

    return ConfigRefused(str(exc))


def create_app(config: GatewayConfig, storage: Storage | None = None) -> web.Application:
    """The gateway app. ``app[CONFIG_KEY]`` is the config, ``app[GATEWAY_KEY]`` the core."""
    # Bodies are read (and bounded) by the handlers themselves, as they stream in.
    storage = storage or default_storage(config)
    app = web.Application(middlewares=[error_middleware], client_max_size=1024**3)
    app[CONFIG_KEY] = config
    gateway = Gateway(config, storage, GatewayMetrics(config.metrics_max_sids))
    app[GATEWAY_KEY] = gateway

    public_api.install(app)
    stream_route.install(app)
    agent_api.install(app)
    link_server.install(app)
    ops_routes.install(app)
    proxy_route.install(app, config)
    share = _proxy_share(gateway.storage, app)

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        try:
            await gateway.start()
            if share is not None:
                await share.start()
        except StorageRefused as exc:
            raise _refused(exc) from None
        yield
        await gateway.close()

    async def shutting_down(_: web.Application) -> None:
        gateway.stop_waiting()

    app.cleanup_ctx.insert(0, lifecycle)
    app.on_shutdown.append(shutting_down)
    return app


def _proxy_share(storage: Storage, app: web.Application) -> ProxyShare | None:
    """With the NATS store, the replicas share their proxy registries."""
    if "spirit_gpu.gateway.storage.nats.store" not in sys.modules:
        return None  # (never imported: not the NATS store)
    from spirit_gpu.gateway.storage.nats import NatsStorage
    from spirit_gpu.gateway.storage.nats.proxy_share import ProxyShare  # noqa: F811

    if not isinstance(storage, NatsStorage):
        return None
    return ProxyShare(storage, app[proxy_route.ROUTER_KEY].registry)
