"""Serve a gateway until asked to stop (the CLI's room for the running server)."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
from collections.abc import Callable

from aiohttp import web

from spirit_gpu.gateway.app import create_app
from spirit_gpu.gateway.config import GatewayConfig
from spirit_gpu.gateway.conn_guard import ConnGuard, connection_cap, raise_fd_limit
from spirit_gpu.gateway.log_redact import redact_logs
from spirit_gpu.log import logger


class ConfigRefused(Exception):
    """The configuration is unsafe or incomplete; the message says what to do."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check(config: GatewayConfig) -> None:
    if not config.api_keys:
        raise ConfigRefused(
            "refusing to start without an API key: pass --api-key KEY (or set "
            "SPIRIT_API_KEYS=key1,key2); clients send it as 'Authorization: Bearer KEY'")
    if not is_loopback(config.host) and not config.worker_token:
        raise ConfigRefused(
            f"refusing to listen on {config.host} without a worker token: anyone who can "
            "reach the port could pose as a worker and read every request. Pass "
            "--worker-token TOKEN (or SPIRIT_WORKER_TOKEN) and give workers the same "
            "SPIRIT_WORKER_TOKEN, or listen on 127.0.0.1")


async def serve(config: GatewayConfig, stop: asyncio.Event,
                on_ready: Callable[[int], None] | None = None) -> None:
    """Run until ``stop`` is set. ``on_ready`` gets the bound port (useful with port 0)."""
    check(config)
    redact_logs([*config.api_keys, config.worker_token])
    fd_limit = raise_fd_limit()
    cap = connection_cap(config.max_connections, fd_limit)
    if cap < config.max_connections:
        logger.warn(f"max_connections lowered from {config.max_connections} to {cap}: the "
                    f"open-file limit is {fd_limit} (raise it with ulimit -n)")
    app = create_app(config)
    guard = ConnGuard(config.head_timeout, config.body_timeout, cap)
    guard.install(app)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    gc.freeze()  # modules and the app live on: full collections need not rescan them
    server: asyncio.Server | None = None
    try:
        server = await guard.listen(runner, config.host, config.port)
        port = int(server.sockets[0].getsockname()[1])
        if on_ready is not None:
            on_ready(port)
        await stop.wait()
    finally:
        if server is not None:
            server.close()
        await runner.cleanup()
