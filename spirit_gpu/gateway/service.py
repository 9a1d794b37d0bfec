"""The gateway's shared core: what the public API, the plain agent API and the
link all call, so every path ends in the same storage calls."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable

import msgspec
from aiohttp import web

from spirit_gpu.gateway.config import GatewayConfig
from spirit_gpu.gateway.metrics import GatewayMetrics
from spirit_gpu.gateway.storage.base import (
    CANCELLED_CODE,
    CancelOutcome,
    NewRequest,
    RequestRecord,
    Storage,
)
from spirit_gpu.protocol import agent
from spirit_gpu.protocol.agent import Envelope

FEATURES = ("longpoll", "stream", "cancel", "link")

CancelPusher = Callable[[list[str]], None]


_envelope = msgspec.json.Encoder()


def ease_headers(rec: RequestRecord) -> dict[str, str]:
    return {agent.MODE_HEADER: rec.mode, agent.REQUEST_ID_HEADER: rec.request_id,
            agent.ENQUEUE_AT_HEADER: str(rec.enqueued_at),
            agent.CREATE_AT_HEADER: str(rec.created_at),
            agent.TTL_HEADER: str(rec.ttl_ms), agent.WEBHOOK_HEADER: rec.webhook}


def envelope(rec: RequestRecord) -> bytes:
    return _envelope.encode(Envelope(headers=ease_headers(rec),
                                     body=base64.b64encode(rec.body).decode()))


def worker_identity(request: web.Request) -> str:
    """A plain worker has no id of its own; ``Spirit-Worker-Id`` names it when sent."""
    return request.headers.get(agent.WORKER_ID_HEADER) or f"addr:{request.remote}"


class Gateway:
    def __init__(self, config: GatewayConfig, storage: Storage,
                 metrics: GatewayMetrics) -> None:
        self.config = config
        self.storage = storage
        self.metrics = metrics
        self.links: dict[str, CancelPusher] = {}  # request id -> its link's cancel pusher
        storage.on_finish = metrics.on_finish
        storage.on_remote_cancel = self.push_cancels
        self._sweeper: asyncio.Task[None] | None = None

    # --- life --------------------------------------------------------------------
    async def start(self) -> None:
        await self.storage.start()
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        await self.storage.close()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval)
            await self.storage.sweep()

    # --- clients -------------------------------------------------------------------
    async def submit(self, req: NewRequest) -> RequestRecord:
        rec = await self.storage.submit(req)
        self.metrics.on_accept(rec.sid, rec.mode)
        return rec

    async def cancel(self, sid: str, request_id: str, sequence: int | None,
                     code: int = CANCELLED_CODE, message: str = "cancelled") -> CancelOutcome:
        outcome = await self.storage.cancel(sid, request_id, sequence, code, message)
        if outcome is CancelOutcome.CANCELLED_RUNNING:
            push = self.links.get(request_id)
            if push is not None:
                push([request_id])
        return outcome

    def push_cancels(self, request_ids: list[str]) -> None:
        """Running requests cancelled (here or through another replica): tell the links
        here that hold them."""
        for request_id in request_ids:
            push = self.links.get(request_id)
            if push is not None:
                push([request_id])

    # --- workers --------------------------------------------------------------------
    def long_poll_seconds(self, wait_ms: int) -> float:
        return max(0.0, min(wait_ms / 1000, self.config.long_poll_max,
                            self.config.lease_seconds / 2))

    def result_limit(self, mode: str) -> int:
        c = self.config
        return c.max_result_bytes_sync if mode == "sync" else c.max_result_bytes_async

    async def report_started(self, sid: str, request_id: str) -> None:
        await self.storage.mark_started(sid, request_id)

    async def report_result(self, sid: str, request_id: str, status_code: int, message: str,
                            data: bytes) -> str:
        """Store a worker's result. Returns "" or why it was refused (result too large)."""
        self.links.pop(request_id, None)
        rec = await self.storage.get(sid, request_id)
        if rec is None:
            return "request not found"
        limit = self.result_limit(rec.mode)
        if len(data) > limit:
            why = (f"result too large: {len(data)} bytes, the limit for {rec.mode} "
                   f"requests is {limit} bytes")
            await self.storage.finish(sid, request_id, 500, why,
                                      msgspec.json.encode({"error": why}))
            return why
        await self.storage.finish(sid, request_id, status_code, message, data)
        return ""


GATEWAY_KEY: web.AppKey[Gateway] = web.AppKey("spirit_gateway", Gateway)
"""Where ``create_app`` puts the ``Gateway``: ``app[GATEWAY_KEY]``."""
