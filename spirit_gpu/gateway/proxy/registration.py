"""The registration extension of the agent API: proxy workers say where they are.

``/agent/{sid}/apis/v1/proxy/register | deregister | workers | link`` (wire
format in ``spirit_gpu.protocol.proxy``). The same checks as the rest of the
agent API, in the same order: the worker token (``auth.require_worker``), the
serverless id (``httpio.serverless_id``), then the body, read with the
bounded reader before it is decoded. Errors are the agent API's
``{"error": msg}`` (``httpio.error_middleware``); every answer names ``proxy``
in ``Spirit-Agent-Features`` (``route.install`` adds it).
"""

from __future__ import annotations

from typing import TypeVar

import msgspec
from aiohttp import web

from spirit_gpu.gateway.auth import require_worker
from spirit_gpu.gateway.config import GatewayConfig
from spirit_gpu.gateway.httpio import ApiError, json_response, read_body, serverless_id
from spirit_gpu.gateway.proxy.link import GatewayLink
from spirit_gpu.gateway.proxy.registry import ProxyRegistry
from spirit_gpu.log import logger
from spirit_gpu.protocol.proxy import (
    DEREGISTER_PATH,
    LINK_PATH,
    REGISTER_PATH,
    WORKERS_PATH,
    ProxyDeregistration,
    ProxyRegistration,
    ProxyWorkers,
    RegisterReply,
)

MAX_BODY = 64 * 1024  # a registration is a few hundred bytes
T = TypeVar("T")


class Registration:
    """The four endpoints, over one ``ProxyRegistry``."""

    def __init__(self, config: GatewayConfig, registry: ProxyRegistry) -> None:
        self.config = config
        self.registry = registry

    def install(self, app: web.Application) -> None:
        base = "/agent/{sid}"
        app.router.add_post(base + REGISTER_PATH, self.register)
        app.router.add_post(base + DEREGISTER_PATH, self.deregister)
        app.router.add_get(base + WORKERS_PATH, self.workers)
        app.router.add_get(base + LINK_PATH, self.link)

    def _checked(self, request: web.Request) -> str:
        """Authenticate the worker; the serverless id."""
        require_worker(request, self.config)
        return serverless_id(request)

    async def _body(self, request: web.Request, kind: type[T], what: str) -> T:
        raw = await read_body(request, MAX_BODY)
        try:
            return msgspec.json.decode(raw, type=kind)
        except msgspec.ValidationError as exc:
            raise ApiError(400, f"invalid {what}: {exc}") from exc
        except msgspec.DecodeError as exc:
            raise ApiError(400, f"invalid {what} JSON: {exc}") from exc

    async def register(self, request: web.Request) -> web.Response:
        sid = self._checked(request)
        reg = await self._body(request, ProxyRegistration, "registration")
        if not reg.url.startswith(("http://", "https://")) or not reg.workerID:
            raise ApiError(400, "invalid registration: url must be http(s)://host:port and "
                                "workerID non-empty")
        self.registry.register(sid, reg)
        return json_response(RegisterReply(workerID=reg.workerID,
                                           leaseSeconds=self.config.lease_seconds,
                                           link=LINK_PATH))

    async def deregister(self, request: web.Request) -> web.Response:
        sid = self._checked(request)
        dereg = await self._body(request, ProxyDeregistration, "deregistration")
        self.registry.deregister(sid, dereg.workerID)
        return json_response({})

    async def workers(self, request: web.Request) -> web.Response:
        sid = self._checked(request)
        return json_response(ProxyWorkers(workers=self.registry.workers(sid)))

    async def link(self, request: web.Request) -> web.StreamResponse:
        """The proxy link: the worker dials in, exchanges are multiplexed over it."""
        sid = self._checked(request)
        worker_id = request.query.get("workerID", "")
        worker = self.registry.get(sid, worker_id)
        if worker is None:
            raise ApiError(404, f"unknown proxy worker {worker_id!r}: register first")
        ws = web.WebSocketResponse(max_msg_size=0, heartbeat=30.0)
        await ws.prepare(request)
        link = GatewayLink(ws)
        worker.link = link
        logger.info(f"proxy worker {worker_id} of {sid}: link up")
        try:
            await link.read_loop()
        finally:
            if worker.link is link:
                worker.link = None
            if self.registry.get(sid, worker_id) is worker:
                self.registry.drop(worker, "its proxy link closed")
        return ws
