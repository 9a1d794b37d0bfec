"""The multiplexed worker link, gateway side: GET /agent/<sid>/apis/v1/link.

One WebSocket per worker; frames from ``spirit_gpu.protocol.link``. Jobs flow out
as ``Dispatch`` frames against the worker's credits; everything coming back
ends in the same ``Gateway``/storage calls as the plain agent API. To a worker
that asks (``Spirit-Link-Stored: 1``), ``Stored(upto)`` says how many of the
frames it sent on this link were handled: frames are numbered as read and,
handled at once for different requests, may finish out of order, so ``upto`` is
the longest run of handled frames from the first (``Handled``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import Awaitable

import msgspec
from aiohttp import WebSocketError, WSCloseCode, WSMsgType, web

from spirit_gpu.gateway.auth import require_worker
from spirit_gpu.gateway.httpio import serverless_id
from spirit_gpu.gateway.service import FEATURES, GATEWAY_KEY, LINK_WORKER_PREFIX, Gateway
from spirit_gpu.gateway.storage.base import RequestRecord
from spirit_gpu.gateway.webhooks import RELAY_PATH
from spirit_gpu.log import logger
from spirit_gpu.net.batch_writer import BatchWriter, ws_sink
from spirit_gpu.protocol import link as lp
from spirit_gpu.protocol.agent import API_PREFIX, WORKER_ID_HEADER

PATH = "/agent/{sid}/apis/v1/link"
MAX_REFUSED = 1000  # frames about other workers' requests before the link is closed
# frames handled at once on one link when storage calls wait on the network; past it
# the link is read no further until one is done (the worker's writes push back)
MAX_CONCURRENT_FRAMES = 512
# how long a confirmation waits for more frames handled: at most one Stored frame this
# often per link, however many frames it covers
CONFIRM_EVERY = 0.01


class Handled:
    """Which of a link's frames were handled. Frames are numbered as they are read
    (from 1) and may finish in any order; ``upto`` is the number of frames handled
    before the first one still being handled (or not handled: it failed)."""

    def __init__(self) -> None:
        self.read = 0
        self._open: deque[int] = deque()  # numbers being handled, in order
        self._early: set[int] = set()  # handled while an earlier one was not

    def start(self) -> int:
        self.read += 1
        self._open.append(self.read)
        return self.read

    def finish(self, n: int) -> None:
        opened = self._open
        if not opened or opened[0] != n:
            self._early.add(n)
            return
        opened.popleft()
        while opened and opened[0] in self._early:
            self._early.remove(opened.popleft())

    @property
    def upto(self) -> int:
        return self._open[0] - 1 if self._open else self.read


def dispatch_frame(rec: RequestRecord, agent_base: str = "") -> lp.Dispatch:
    """With ``agent_base`` (how the worker reaches this agent API), a webhook becomes the
    gateway's relay, as on the plain protocol (webhooks.py): the first end wins."""
    webhook = rec.webhook
    if webhook and agent_base:
        webhook = f"{agent_base}/{RELAY_PATH}/{rec.request_id}"
    return lp.Dispatch(request_id=rec.request_id, mode=rec.mode, webhook=webhook,
                       enqueue_at=rec.enqueued_at, create_at=rec.created_at,
                       ttl_ms=rec.ttl_ms, body=rec.body)


SHUTDOWN_DRAIN = 1.0  # seconds a link running jobs still takes their frames at shutdown


class LinkSession:
    """One connected worker."""

    def __init__(self, gw: Gateway, sid: str, worker: str, ws: web.WebSocketResponse,
                 batches: bool = False, anonymous: bool = True, agent_base: str = "",
                 confirms: bool = False, max_message: int = 0) -> None:
        self.gw = gw
        self.agent_base = agent_base  # the relay's base for dispatched webhooks
        self.batches = batches  # the worker reads Batch messages
        self.confirms = confirms  # the worker reads Stored frames
        self.max_message = max_message  # the largest message this link reads
        self.handled = Handled()
        self.confirmed = 0  # the last Stored frame's upto
        self.confirm_due: asyncio.TimerHandle | None = None
        self.failed = False  # a frame's storage call failed: the link is closing
        self.sid = sid
        self.worker = worker
        self.anonymous = anonymous  # the worker sent no Spirit-Worker-Id
        self.ws = ws
        self.credits = 0
        self.credit_changed = asyncio.Event()
        self.held: set[str] = set()  # dispatched to (or adopted by) this link, not yet acked
        self.refused = 0  # frames about requests this worker does not hold
        self.last_touch = 0.0
        # a request's frames are handled in order by one task, those of different
        # requests at once (one storage round trip each need not queue behind another
        # request's): per request with a task, the frames waiting for it
        self.queued: dict[str, deque[tuple[lp.Frame, int]]] = {}
        self.pending: set[asyncio.Task[None]] = set()
        self.unhandled = 0  # frames read and not handled yet
        self.room = asyncio.Event()
        self.concurrent = gw.storage.waits_on_network
        self.closing: asyncio.Task[bool] | None = None
        # dispatches, cancels: what a loop turn sends goes out as one message
        self.writer: BatchWriter[lp.Frame] = BatchWriter(
            lp.encode_many, ws_sink(ws.send_bytes), max_batch=0 if batches else 1,
            on_error=self._unsent)

    async def run(self) -> None:
        lease_ms = int(self.gw.config.lease_seconds * 1000)
        await self.ws.send_bytes(lp.encode(lp.Welcome(
            version=lp.VERSION, lease_ms=lease_ms, features=[*FEATURES, "batch", lp.STORED],
            max_message=self.max_message)))
        await self.gw.storage.touch_worker(self.sid, self.worker)
        dispatcher = asyncio.create_task(self._dispatch())
        self.gw.on_stop.add(self._stop)
        if self.gw.stopping:  # (opened while the gateway was stopping)
            self._stop()
        try:
            async for msg in self.ws:
                if msg.type != WSMsgType.BINARY:
                    if msg.type == WSMsgType.ERROR and isinstance(msg.data, WebSocketError) \
                            and msg.data.code == WSCloseCode.MESSAGE_TOO_BIG:
                        await self._too_big(str(msg.data))
                    break
                try:
                    frames = lp.decode_all(msg.data)
                except msgspec.DecodeError:
                    await self.ws.close(code=1002, message=b"malformed frame")
                    break
                for frame in frames:
                    if self.ws.closed:
                        break
                    n = self.handled.start()
                    if self.concurrent and isinstance(frame, lp.REQUEST_FRAMES):
                        await self._start(frame, n)
                    else:
                        self._done(n, await self._on_frame(frame))
        finally:
            self.gw.on_stop.discard(self._stop)
            dispatcher.cancel()
            if self.confirm_due is not None:
                self.confirm_due.cancel()
            # what the worker sent before it went is still stored
            await asyncio.gather(dispatcher, *self.pending, return_exceptions=True)
            await self.writer.close()
            for request_id in self.held:
                if self.gw.links.get(request_id) == self.push_cancel:
                    del self.gw.links[request_id]
            if self.refused:
                logger.warn(f"link {self.worker} ({self.sid}) closed; {self.refused} frame(s) "
                            "about requests not dispatched to it were refused")

    # --- outbound ---------------------------------------------------------------
    async def _dispatch(self) -> None:
        wait = min(self.gw.config.long_poll_max, self.gw.config.lease_seconds / 2)
        storage = self.gw.storage
        while True:
            while self.credits <= 0 and not self.gw.stopping:
                self.credit_changed.clear()
                await self.credit_changed.wait()
            if self.gw.stopping:
                return
            rec = await storage.take(self.sid, self.worker, wait)
            if rec is None:
                continue
            taken = [rec]  # with whatever else is queued now, in one message
            if self.batches and self.credits > 1:
                taken += await storage.take_more(self.sid, self.worker, self.credits - 1)
            if self.ws.closed:
                for r in taken:
                    await storage.give_back(self.sid, r.request_id)
                return
            self.credits -= len(taken)
            for r in taken:
                self.held.add(r.request_id)
                self.gw.links[r.request_id] = self.push_cancel
                self.writer.send(dispatch_frame(r, self.agent_base))
            self.writer.flush()  # written now, with anything else queued this turn
            await self.writer.wait_drained()  # a link that pushes back holds dispatching

    def _stop(self) -> None:
        """The gateway is shutting down: no more jobs; the link closes once the jobs it
        holds are acked, or ``SHUTDOWN_DRAIN`` s from now. Meanwhile their frames are
        still stored (a start cut off here would leave its job to the lease alone);
        the worker sends what came too late again on its next link."""
        self.credit_changed.set()  # (the dispatcher sees the gateway stopping and ends)
        if self.held:
            asyncio.get_running_loop().call_later(SHUTDOWN_DRAIN, self._close_going_away)
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if self.gw.stopping and not self.held:
            self._close_going_away()

    def _close_going_away(self) -> None:
        if not self.ws.closed and self.closing is None:
            # the worker reconnects (to another replica, or to this one restarted)
            self.closing = asyncio.create_task(self.ws.close(
                code=WSCloseCode.GOING_AWAY, message=b"gateway shutting down"))

    def _unsent(self, frames: list[lp.Frame], exc: Exception) -> Awaitable[None] | None:
        """A message the link did not take: its jobs go back to the queue."""
        lost = [f.request_id for f in frames if isinstance(f, lp.Dispatch)]
        return self._give_back(lost) if lost else None

    async def _give_back(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.held.discard(request_id)
            await self.gw.storage.give_back(self.sid, request_id)
        self._close_if_idle()

    def push_cancel(self, request_ids: list[str]) -> None:
        self.writer.send(lp.Cancel(request_ids=request_ids))

    # --- confirmations -----------------------------------------------------------------
    def _done(self, n: int, kept: asyncio.Future[None] | None = None) -> None:
        """Frame ``n`` was handled (and, with ``kept``, is kept once that is done); a
        confirmation follows within ``CONFIRM_EVERY``."""
        if kept is not None and not kept.done():
            kept.add_done_callback(lambda _: self._done(n))
            return
        self.handled.finish(n)
        if self.confirms and self.confirm_due is None:
            self.confirm_due = asyncio.get_running_loop().call_later(CONFIRM_EVERY, self._confirm)

    def _confirm(self) -> None:
        self.confirm_due = None
        upto = self.handled.upto
        if upto > self.confirmed and not self.ws.closed:
            self.confirmed = upto
            self.writer.send(lp.Stored(upto=upto))

    # --- inbound -------------------------------------------------------------------
    async def _start(self, frame: lp.Metric | lp.Result | lp.Ack | lp.Chunk, n: int) -> None:
        rid = frame.request_id
        self.unhandled += 1
        waiting = self.queued.get(rid)
        if waiting is not None:
            waiting.append((frame, n))
        else:
            self.queued[rid] = deque()
            task = asyncio.create_task(self._handle_in_order(rid, frame, n))
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)
        if self.unhandled >= MAX_CONCURRENT_FRAMES:
            self.room.clear()
            await self.room.wait()

    async def _handle_in_order(self, rid: str, frame: lp.Frame, n: int) -> None:
        waiting = self.queued[rid]
        try:
            while True:
                try:
                    # after a frame failed, later ones are neither handled nor confirmed:
                    # the worker sends them again, in order, on its next link
                    if not (self.failed and self.confirms):
                        self._done(n, await self._on_frame(frame))
                finally:
                    self._handled(1)
                if not waiting:
                    return
                frame, n = waiting.popleft()
        except Exception as exc:
            self.failed = True
            # as when frames were handled inline: the link ends, the worker reconnects
            logger.warn(f"link {self.worker} ({self.sid}): a frame about {rid} failed: "
                        f"{exc!r}; closing the link", request_id=rid)
            if not self.ws.closed and self.closing is None:
                self.closing = asyncio.create_task(self.ws.close(
                    code=WSCloseCode.INTERNAL_ERROR, message=b"storage failed"))
        finally:
            del self.queued[rid]
            self._handled(len(waiting))  # (left unhandled when the link ends)

    def _handled(self, n: int) -> None:
        self.unhandled -= n
        if self.unhandled < MAX_CONCURRENT_FRAMES:
            self.room.set()

    async def _on_frame(self, frame: lp.Frame) -> asyncio.Future[None] | None:
        """Handle one frame; a future when what it said is kept only once that is done
        (its confirmation waits for it)."""
        gw, sid = self.gw, self.sid
        now = time.monotonic()
        if now - self.last_touch > gw.config.lease_seconds / 8:
            self.last_touch = now
            await gw.storage.touch_worker(sid, self.worker)
        match frame:
            case lp.Credit(n=n):
                # capped: one worker granting millions must not take the whole queue
                self.credits = min(max(0, self.credits + n), gw.config.link_max_credits)
                self.credit_changed.set()
            case lp.Metric(request_id=request_id, status=status, message=message):
                if status == "executing" and await self._holds(request_id, "metric"):
                    await gw.report_started(sid, request_id)
                    return gw.storage.written(request_id)
                elif status in ("succeed", "failed") and await self._holds(request_id, "metric"):
                    await gw.report_final(sid, request_id, status, message)
            case lp.Result(request_id=request_id, status_code=code, message=message, data=data):
                if await self._holds(request_id, "result"):
                    await gw.report_result(sid, request_id, code, message, data)
            case lp.Ack(request_id=request_id):
                if await self._holds(request_id, "ack"):
                    self.held.discard(request_id)
                    await gw.storage.ack(sid, request_id)
                    self._close_if_idle()
            case lp.Chunk(request_id=request_id, seq=seq, data=data):
                if await self._holds(request_id, "chunk"):
                    await gw.storage.add_chunk(sid, request_id, seq, data)
            case lp.Heartbeat(request_ids=ids):
                # only what this worker can hold is looked at: a heartbeat naming
                # half a million ids costs no more than one naming its own jobs
                room = len(self.held) + gw.config.link_max_credits
                mine = [i for i in ids[:room] if i in self.held or await self._holds(i, "")]
                cancel = await gw.storage.heartbeat(sid, self.worker, mine)
                if cancel:
                    self.writer.send(lp.Cancel(request_ids=cancel))
            case _:
                pass  # gateway-to-worker frames coming back: ignore
        return None

    async def _holds(self, request_id: str, what: str) -> bool:
        """Whether the request was dispatched to this worker: on this link, or on an
        earlier link of the same worker (a worker reports its running jobs on the link
        it reconnects with). A frame about any other request is refused."""
        if request_id in self.held:
            return True
        rec = await self.gw.storage.get(self.sid, request_id)
        if request_id in self.held:  # taken over meanwhile (a heartbeat naming it)
            return True
        mine = rec is not None and rec.delivered and (
            rec.holder == self.worker
            # a worker without an id cannot be recognised: it may take over a job
            # whose own link is gone (and only such a job)
            or (self.anonymous and rec.holder.startswith(LINK_WORKER_PREFIX)
                and request_id not in self.gw.links))
        if not mine and rec is not None and not rec.terminal and not rec.delivered:
            # no delivery on record: the replica that made it may have died before
            # writing it down, while this worker ran the job
            mine = await self.gw.storage.adopt(self.sid, request_id, self.worker)
        if mine:
            assert rec is not None
            if not rec.terminal:
                self.held.add(request_id)
                self.gw.links[request_id] = self.push_cancel
            return True
        if what:
            self.refused += 1
            if self.refused == 1:
                known = "no record" if rec is None else (
                    f"its record: {rec.status}, held by {rec.holder or 'nobody'}")
                logger.warn(f"link {self.worker} ({self.sid}): refused a {what} for request "
                            f"{request_id!r}, which was not dispatched to this worker "
                            f"({known})")
            if self.refused == MAX_REFUSED:  # each costs a storage lookup: no flood of them
                if self.confirms:  # what was handled need not come again
                    self._confirm()
                    self.writer.flush()
                await self.ws.close(code=WSCloseCode.POLICY_VIOLATION,
                                    message=b"too many frames about requests not dispatched "
                                            b"to this worker")
        return False

    async def _too_big(self, why: str) -> None:
        """The worker sent a message over the link's size limit (the link is closed with
        1009). A result is the only frame that large: when this link held one unfinished
        job, that job ends now as "result too large" instead of waiting for its lease."""
        storage = self.gw.storage
        unfinished = []
        for request_id in self.held:
            rec = await storage.get(self.sid, request_id)
            if rec is not None and not rec.terminal:
                unfinished.append(rec)
        if len(unfinished) != 1:
            logger.warn(f"link {self.worker} ({self.sid}) closed: {why}; it held "
                        f"{len(unfinished)} unfinished jobs, so which result was too large "
                        "is not known")
            return
        rec = unfinished[0]
        limit = self.gw.result_limit(rec.mode)
        message = (f"result too large: the worker sent more than the link carries ({why}); "
                   f"the limit for {rec.mode} results is {limit} bytes")
        logger.warn(f"link {self.worker} ({self.sid}) closed: {message}",
                    request_id=rec.request_id)
        await storage.finish(self.sid, rec.request_id, 500, message,
                             msgspec.json.encode({"error": message}))


async def link(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    require_worker(request, gw.config)
    sid = serverless_id(request)
    named = request.headers.get(WORKER_ID_HEADER)
    worker = f"{LINK_WORKER_PREFIX}{named or uuid.uuid4().hex}"
    limit = gw.config.max_result_bytes_sync + 1024 * 1024
    max_message = max(limit, gw.config.max_body_bytes + 1024 * 1024)
    ws = web.WebSocketResponse(max_msg_size=max_message)
    if not ws.can_prepare(request).ok:
        raise web.HTTPBadRequest(reason="the link is a WebSocket: send an Upgrade request")
    await ws.prepare(request)
    batches = request.headers.get(lp.BATCH_HEADER) == "1"
    confirms = request.headers.get(lp.STORED_HEADER) == "1"
    agent_base = f"{request.url.origin()}/agent/{sid}{API_PREFIX}"
    await LinkSession(gw, sid, worker, ws, batches, anonymous=not named, agent_base=agent_base,
                      confirms=confirms, max_message=max_message).run()
    return ws


def install(app: web.Application) -> None:
    app.router.add_get(PATH, link)
