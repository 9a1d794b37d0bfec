"""Proxy route: requests carrying ``Auth: <sid>-<api-key>`` go to a proxy-mode worker."""

from __future__ import annotations

from aiohttp import web

from spirit_gpu.gateway.config import GatewayConfig


def install(app: web.Application, config: GatewayConfig) -> None:
    """Mounts proxy routes (issue 5)."""
