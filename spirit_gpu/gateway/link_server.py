"""The multiplexed worker link, gateway side: GET /agent/<sid>/apis/v1/link.

One WebSocket per worker; frames from ``spirit_gpu.protocol.link``. Jobs flow out
as ``Dispatch`` frames against the worker's credits; everything coming back
ends in the same ``Gateway``/storage calls as the plain agent API.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable

import msgspec
from aiohttp import WSMsgType, web

from spirit_gpu.gateway.auth import require_worker
from spirit_gpu.gateway.httpio import serverless_id
from spirit_gpu.gateway.service import FEATURES, GATEWAY_KEY, Gateway
from spirit_gpu.gateway.storage.base import RequestRecord
from spirit_gpu.net.batch_writer import BatchWriter, ws_sink
from spirit_gpu.protocol import link as lp
from spirit_gpu.protocol.agent import WORKER_ID_HEADER

PATH = "/agent/{sid}/apis/v1/link"


def dispatch_frame(rec: RequestRecord) -> lp.Dispatch:
    return lp.Dispatch(request_id=rec.request_id, mode=rec.mode, webhook=rec.webhook,
                       enqueue_at=rec.enqueued_at, create_at=rec.created_at,
                       ttl_ms=rec.ttl_ms, body=rec.body)


class LinkSession:
    """One connected worker."""

    def __init__(self, gw: Gateway, sid: str, worker: str, ws: web.WebSocketResponse,
                 batches: bool = False) -> None:
        self.gw = gw
        self.batches = batches  # the worker reads Batch messages
        self.sid = sid
        self.worker = worker
        self.ws = ws
        self.credits = 0
        self.credit_changed = asyncio.Event()
        self.held: set[str] = set()
        self.last_touch = 0.0
        # dispatches, cancels: what a loop turn sends goes out as one message
        self.writer: BatchWriter[lp.Frame] = BatchWriter(
            lp.encode_many, ws_sink(ws.send_bytes), max_batch=0 if batches else 1,
            on_error=self._unsent)

    async def run(self) -> None:
        lease_ms = int(self.gw.config.lease_seconds * 1000)
        await self.ws.send_bytes(lp.encode(lp.Welcome(version=lp.VERSION, lease_ms=lease_ms,
                                                      features=[*FEATURES, "batch"])))
        await self.gw.storage.touch_worker(self.sid, self.worker)
        dispatcher = asyncio.create_task(self._dispatch())
        try:
            async for msg in self.ws:
                if msg.type != WSMsgType.BINARY:
                    break
                try:
                    frames = lp.decode_all(msg.data)
                except msgspec.DecodeError:
                    await self.ws.close(code=1002, message=b"malformed frame")
                    break
                for frame in frames:
                    await self._on_frame(frame)
        finally:
            dispatcher.cancel()
            await asyncio.gather(dispatcher, return_exceptions=True)
            await self.writer.close()
            for request_id in self.held:
                if self.gw.links.get(request_id) == self.push_cancel:
                    del self.gw.links[request_id]

    # --- outbound ---------------------------------------------------------------
    async def _dispatch(self) -> None:
        wait = min(self.gw.config.long_poll_max, self.gw.config.lease_seconds / 2)
        storage = self.gw.storage
        while True:
            while self.credits <= 0:
                self.credit_changed.clear()
                await self.credit_changed.wait()
            rec = await storage.take(self.sid, self.worker, wait)
            if rec is None:
                continue
            taken = [rec]  # with whatever else is queued now, in one message
            while self.batches and len(taken) < self.credits:
                more = await storage.take(self.sid, self.worker, 0)
                if more is None:
                    break
                taken.append(more)
            if self.ws.closed:
                for r in taken:
                    await storage.give_back(self.sid, r.request_id)
                return
            self.credits -= len(taken)
            for r in taken:
                self.held.add(r.request_id)
                self.gw.links[r.request_id] = self.push_cancel
                self.writer.send(dispatch_frame(r))
            self.writer.flush()  # written now, with anything else queued this turn
            await self.writer.wait_drained()  # a link that pushes back holds dispatching

    def _unsent(self, frames: list[lp.Frame], exc: Exception) -> Awaitable[None] | None:
        """A message the link did not take: its jobs go back to the queue."""
        lost = [f.request_id for f in frames if isinstance(f, lp.Dispatch)]
        return self._give_back(lost) if lost else None

    async def _give_back(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.held.discard(request_id)
            await self.gw.storage.give_back(self.sid, request_id)

    def push_cancel(self, request_ids: list[str]) -> None:
        self.writer.send(lp.Cancel(request_ids=request_ids))

    # --- inbound -------------------------------------------------------------------
    async def _on_frame(self, frame: lp.Frame) -> None:
        gw, sid = self.gw, self.sid
        now = time.monotonic()
        if now - self.last_touch > gw.config.lease_seconds / 8:
            self.last_touch = now
            await gw.storage.touch_worker(sid, self.worker)
        match frame:
            case lp.Credit(n=n):
                self.credits = max(0, self.credits + n)
                self.credit_changed.set()
            case lp.Metric(request_id=request_id, status=status):
                if status == "executing":
                    await gw.report_started(sid, request_id)
            case lp.Result(request_id=request_id, status_code=code, message=message, data=data):
                self.held.discard(request_id)
                await gw.report_result(sid, request_id, code, message, data)
            case lp.Ack(request_id=request_id):
                self.held.discard(request_id)
                await gw.storage.ack(sid, request_id)
            case lp.Chunk(request_id=request_id, seq=seq, data=data):
                await gw.storage.add_chunk(sid, request_id, seq, data)
            case lp.Heartbeat(request_ids=ids):
                cancel = await gw.storage.heartbeat(sid, self.worker, ids)
                if cancel:
                    self.writer.send(lp.Cancel(request_ids=cancel))
            case _:
                pass  # gateway-to-worker frames coming back: ignore


async def link(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    require_worker(request, gw.config)
    sid = serverless_id(request)
    worker = f"link:{request.headers.get(WORKER_ID_HEADER) or uuid.uuid4().hex}"
    limit = gw.config.max_result_bytes_sync + 1024 * 1024
    ws = web.WebSocketResponse(max_msg_size=max(limit, gw.config.max_body_bytes + 1024 * 1024))
    if not ws.can_prepare(request).ok:
        raise web.HTTPBadRequest(reason="the link is a WebSocket: send an Upgrade request")
    await ws.prepare(request)
    batches = request.headers.get(lp.BATCH_HEADER) == "1"
    await LinkSession(gw, sid, worker, ws, batches).run()
    return ws


def install(app: web.Application) -> None:
    app.router.add_get(PATH, link)
