"""Serve a gateway until asked to stop (the CLI's room for the running server)."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable

from aiohttp import web

from spirit_gpu.gateway.app import create_app
from spirit_gpu.gateway.config import GatewayConfig


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
    runner = web.AppRunner(create_app(config), access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port, reuse_address=True)
        await site.start()
        port = int(runner.addresses[0][1])
        if on_ready is not None:
            on_ready(port)
        await stop.wait()
    finally:
        await runner.cleanup()
