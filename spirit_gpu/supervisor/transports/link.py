"""The multiplexed link, worker side: the Transport interface over one WebSocket.

Jobs arrive as ``Dispatch`` frames against credits this side grants in
``pull``; results, metrics, chunks, acks and heartbeats go back as frames
(``spirit_gpu.protocol.link``). On a lost link it reconnects on the next call;
jobs dispatched but not yet handed to the worker loop are dropped (the gateway
redelivers them when their lease runs out), running jobs report on the new link.

Outgoing frames go through one ``BatchWriter``: a loop turn's frames travel as
one message, in order. With a gateway that confirms what it stored (``stored``),
the frames that carry a job's state are kept until confirmed and written again,
first thing, on the next link (unconfirmed.py): a frame a dying gateway or
connection took is not lost. With one that does not, a message that could not
be sent is retried whole, in order, before anything queued after it, each frame
with its own number of tries. Either way a result never overtakes its
``executing`` metric, an ack never its result.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import msgspec

from spirit_gpu.log import logger
from spirit_gpu.net import wsio
from spirit_gpu.net.batch_writer import BatchWriter
from spirit_gpu.net.outage import Outage
from spirit_gpu.protocol import agent
from spirit_gpu.protocol import link as lp
from spirit_gpu.protocol.agent import DEFAULT_TTL_MS, HeartbeatReply
from spirit_gpu.retry import Backoff, RetryPolicy
from spirit_gpu.supervisor.jobs import Job, StatusReport, now_ms
from spirit_gpu.supervisor.transports.base import (
    AgentUnavailable,
    Capabilities,
    PullResult,
)
from spirit_gpu.supervisor.transports.unconfirmed import KEEP_BYTES, Outgoing, Unconfirmed

PULL_WAIT = 1.0  # seconds pull() waits for a dispatch before answering []
# A job's "executing" metric waits this long for its result, so a short job's
# metrics, result and ack share one message; a longer job reports it on time.
EXECUTING_DELAY = 0.05
CONNECT_TIMEOUT = 10.0
UNSTARTED_KEPT = 10_000  # handed-over jobs watched for a cancel before they start
# a message the link did not take is retried with this backoff; how many tries a
# frame gets is its own (a result 10, metrics and acks 6, chunks 3, heartbeats 1)
# unless the gateway confirms: then what carries state is kept until it does
RESEND_RETRY = RetryPolicy(first=0.1, factor=2.0, max_delay=5.0)
CLOSE_WAIT = 20.0  # seconds close() gives what is queued or unconfirmed to reach the gateway
_SEND_ERRORS = (AgentUnavailable, aiohttp.ClientError, ConnectionError, RuntimeError)
_CONNECT_ERRORS = (aiohttp.ClientError, OSError, TimeoutError, RuntimeError,
                   msgspec.DecodeError)


def job_from_dispatch(d: lp.Dispatch) -> Job:
    return Job(request_id=d.request_id, mode=d.mode, webhook=d.webhook,
               enqueue_at=d.enqueue_at, create_at=d.create_at,
               ttl_ms=d.ttl_ms or DEFAULT_TTL_MS, body=d.body, received_at=now_ms())


def _settle(items: list[Outgoing], ok: bool) -> None:
    for o in items:
        if o.done is not None and not o.done.done():
            o.done.set_result(ok)


def _sent(items: list[Outgoing]) -> None:
    _settle(items, True)


def _given_up(items: list[Outgoing], error: BaseException) -> None:
    _settle(items, False)
    for o in items:
        if o.request_id:  # a job's report is lost: say so for each one
            logger.error(f"giving up on sending {type(o.frame).__name__.lower()} "
                         f"over the link: {error}", request_id=o.request_id)


def _ids(items: list[Outgoing], most: int = 10) -> str:
    ids = sorted({o.request_id for o in items})
    more = f" and {len(ids) - most} more" if len(ids) > most else ""
    return ", ".join(ids[:most]) + more


class LinkTransport:
    capabilities = Capabilities(batched_pulls=True, instant_metrics=True)

    def __init__(self, session: aiohttp.ClientSession, agent_url: str, token: str = "",
                 keep_bytes: int = KEEP_BYTES) -> None:
        self.session = session
        self.url = agent.endpoint(agent_url, agent.LINK)
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.features: set[str] = set()
        self.lease_ms = 0
        self.outage = Outage(f"agent link at {self.url}")
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._buffer: deque[Job] = deque()
        self._waiters: deque[asyncio.Future[Job | None]] = deque()  # pulls waiting for a job
        self._writer: BatchWriter[Outgoing] = BatchWriter(
            self._encode, self._sink, max_batch=1, on_error=self._unsent, on_sent=_sent)
        self._writing: list[Outgoing] = []  # the batch just encoded, for the sink
        self.unconfirmed = Unconfirmed(keep_bytes)
        self._batches = False  # the gateway reads Batch messages
        self._outstanding = 0  # credits granted and not yet used by a dispatch
        self._executing: dict[str, tuple[asyncio.TimerHandle, lp.Metric]] = {}
        self._cancels: set[str] = set()
        self._cancel_now: Callable[[str], bool] | None = None
        # handed over (to a pull or the buffer), its "executing" not sent yet: a cancel
        # arriving meanwhile (even in the same read as the job) marks the job itself
        self._unstarted: dict[str, Job] = {}
        self._closing: set[asyncio.Task[Any]] = set()  # abandoned connections being closed
        self._closed = False

    # --- connection --------------------------------------------------------------
    async def connect(self) -> None:
        """Open the link and read the gateway's Welcome; then write what the gateway
        has not confirmed yet. Raises when any of it fails."""
        headers = dict(self.headers, **{lp.BATCH_HEADER: "1", lp.STORED_HEADER: "1"})
        ws = await self.session.ws_connect(self.url, headers=headers, max_msg_size=0,
                                           timeout=aiohttp.ClientWSTimeout(ws_close=5.0))
        try:
            first = await ws.receive(timeout=CONNECT_TIMEOUT)
            if first.type != aiohttp.WSMsgType.BINARY:
                raise ConnectionError(f"link closed before the welcome ({first.type.name})")
            welcome = lp.decode(first.data)
            if not isinstance(welcome, lp.Welcome):
                raise ConnectionError(f"link opened with {type(welcome).__name__}, not Welcome")
            self.features = set(welcome.features)
            self._batches = "batch" in self.features
            self._writer.max_batch = 0 if self._batches else 1  # one message per frame
            self.lease_ms = welcome.lease_ms
            confirming = lp.STORED in self.features
            again = self.unconfirmed.new_link(confirming, welcome.max_message)
            await self._write(ws, again)  # before anything else goes on this link
            if not confirming:  # sent once more, as on a link without confirmations
                self.unconfirmed.forget_all()
            if again:
                logger.info(f"sent {len(again)} frame(s) the gateway had not confirmed again "
                            f"on the new link, of request(s) {_ids(again)}")
        except BaseException:
            await ws.close()
            raise
        self._buffer.clear()
        self._outstanding = 0
        self._ws = ws
        self._reader = asyncio.create_task(self._read(ws))

    async def _live(self) -> aiohttp.ClientWebSocketResponse:
        ws = self._ws
        if ws is not None and not ws.closed:
            return ws
        async with self._lock:
            if self._ws is None or self._ws.closed:
                if self._closed:
                    raise AgentUnavailable("link transport closed")
                try:
                    await self.connect()
                except _CONNECT_ERRORS as exc:
                    self.outage.down(exc)
                    raise AgentUnavailable(str(exc)) from exc
                self.outage.up()
            assert self._ws is not None
            return self._ws

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.BINARY:
                    break
                try:
                    frames = lp.decode_all(msg.data)
                except msgspec.DecodeError as exc:
                    logger.error(f"malformed frame on the agent link: {exc}")
                    continue
                for frame in frames:
                    if isinstance(frame, lp.Dispatch):
                        self._outstanding = max(0, self._outstanding - 1)
                        self._deliver(job_from_dispatch(frame))
                    elif isinstance(frame, lp.Stored):
                        if ws is self._ws:  # counted on this link
                            self.unconfirmed.stored(frame.upto)
                    elif isinstance(frame, lp.Cancel):
                        self._cancelled(frame.request_ids)
                        gone = set(frame.request_ids)
                        self._buffer = deque(j for j in self._buffer
                                             if j.request_id not in gone)
        finally:
            self._lost(ws)

    def _cancelled(self, request_ids: list[str]) -> None:
        """Stop running jobs at once (the GPU is freed now, not at the next heartbeat);
        a job handed over and not started is marked, so that it never starts; the rest
        come with the next heartbeat's reply."""
        for request_id in request_ids:
            if self._cancel_now is not None and self._cancel_now(request_id):
                continue
            unstarted = self._unstarted.pop(request_id, None)
            if unstarted is not None:
                unstarted.cancelled = True
            else:
                self._cancels.add(request_id)

    def on_cancel(self, cancel: Callable[[str], bool]) -> None:
        self._cancel_now = cancel

    def _lost(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        if self._ws is not ws:
            return
        self._ws = None
        for job in self._buffer:
            self._unstarted.pop(job.request_id, None)
        self._buffer.clear()  # undelivered: the gateway redelivers them
        self._outstanding = 0
        while self._waiters:  # their pulls answer [] and reconnect next time
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        if not self._closed:
            logger.warn("agent link lost; reconnecting on the next call")

    def _abandon(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """A write on ``ws`` failed: nothing more goes on it (the frames counted on it
        would no longer match what the gateway read); the next call opens a new link."""
        self._lost(ws)
        if not ws.closed:
            task = asyncio.ensure_future(ws.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _deliver(self, job: Job) -> None:
        """Hand a dispatched job to the oldest waiting pull, else buffer it."""
        if len(self._unstarted) > UNSTARTED_KEPT:  # (entries of jobs a lost link took)
            self._unstarted.clear()
        self._unstarted[job.request_id] = job
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(job)
                return
        self._buffer.append(job)

    # --- sending ----------------------------------------------------------------
    def _encode(self, items: list[Outgoing]) -> bytes:
        self._writing = items  # the writer hands the bytes to _sink at once
        return lp.encode_many([o.frame for o in items])

    def _sink(self, data: bytes) -> Awaitable[None] | None:
        items, self._writing = self._writing, []
        ws = self._ws
        if ws is None or ws.closed:
            return self._send_when_up(data, items)  # the next call reconnects
        self.unconfirmed.writing(items)
        coro = ws.send_bytes(data)
        try:
            done, waiting = wsio.start(coro)  # the usual case: written here, no task
        except BaseException:
            self._abandon(ws)
            raise
        return None if done else self._finish(ws, coro, waiting)

    async def _finish(self, ws: aiohttp.ClientWebSocketResponse, coro: wsio.SendCoro,
                      waiting: Any) -> None:
        try:
            await wsio.finish(coro, waiting)
        except Exception:
            self._abandon(ws)
            raise

    async def _send_when_up(self, data: bytes, items: list[Outgoing]) -> None:
        ws = await self._live()
        self.unconfirmed.writing(items)
        try:
            await ws.send_bytes(data)
        except Exception:
            self._abandon(ws)
            raise

    async def _write(self, ws: aiohttp.ClientWebSocketResponse, items: list[Outgoing]) -> None:
        """Write ``items`` on ``ws`` now, counted, in messages the gateway reads."""
        self.unconfirmed.writing(items)
        try:
            if self._batches:
                for part in self.unconfirmed.messages(items):
                    await ws.send_bytes(lp.encode_many([o.frame for o in part]))
            else:
                for o in items:
                    await ws.send_bytes(lp.encode(o.frame))
        except Exception:
            self._abandon(ws)
            raise

    def _unsent(self, items: list[Outgoing], error: Exception) -> Awaitable[None] | None:
        """A message that did not go out. To a gateway that confirms, what carries state
        is kept and goes first on the next link; otherwise it is retried (``_resend``)."""
        if not self.unconfirmed.confirming:
            return self._resend(items, error)
        rest = self.unconfirmed.unsent(items)
        if rest:  # a credit (a new link starts without), a heartbeat (the next one comes)
            _given_up(rest, error)
        return self._relink() if len(self.unconfirmed) else None

    async def _relink(self) -> None:
        """Until the kept frames are written on a link (a new one writes them first);
        the writer holds everything queued after them meanwhile."""
        backoff = Backoff(RESEND_RETRY)
        while not self._closed:
            await backoff.sleep()
            try:
                ws = await self._live()
                await self._write(ws, self.unconfirmed.unwritten())
            except _SEND_ERRORS:
                continue
            return

    async def _resend(self, items: list[Outgoing], error: Exception) -> None:
        """Retry a message that did not go out, whole and in order; the writer holds
        everything queued after it until this ends."""
        backoff = Backoff(RESEND_RETRY)
        while True:
            left = []
            for o in items:  # that try counted for every frame in it
                o.tries -= 1
                if o.tries > 0:
                    left.append(o)
                else:
                    _given_up([o], error)
            items = left
            if not items:
                return
            await backoff.sleep()
            try:
                ws = await self._live()
                await self._write(ws, items)
            except _SEND_ERRORS as exc:
                error = exc
                continue
            _settle(items, True)
            return

    def _send_soon(self, frame: lp.Frame, tries: int, request_id: str = "") -> None:
        """Queue without waiting: frames of one loop turn share a message."""
        self._writer.send(Outgoing(frame, tries, request_id, None))

    async def _send(self, frame: lp.Frame, tries: int) -> bool:
        """Queue and wait until it went out (True) or was given up on (False)."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._writer.send(Outgoing(frame, tries, "", done))
        return await done

    # --- Transport ------------------------------------------------------------------
    async def pull(self, limit: int) -> PullResult:
        ws = await self._live()
        want = limit - len(self._buffer) - self._outstanding
        if want < 0:
            want = max(want, -self._outstanding)
        # top credits up in bulk (one frame per many jobs), never leaving none
        if want > 0 and want >= max(1, limit // 2) or want < 0:
            self._outstanding += want
            self._send_soon(lp.Credit(n=want), 1)  # a lost link resets the credits
        jobs: list[Job] = []
        while self._buffer and len(jobs) < limit:
            jobs.append(self._buffer.popleft())
        if jobs or ws.closed:
            return PullResult(jobs)
        waiter: asyncio.Future[Job | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(PULL_WAIT):
                await waiter
        except TimeoutError:
            pass
        finally:
            if not waiter.done():
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
        # a job handed over in the very turn the timeout fired is still in the waiter
        job = None if waiter.cancelled() else waiter.result()
        jobs = [job] if job is not None else []
        while self._buffer and len(jobs) < limit:  # what arrived with it
            jobs.append(self._buffer.popleft())
        return PullResult(jobs)

    async def metric(self, job: Job, report: StatusReport) -> None:
        frame = lp.Metric(request_id=job.request_id, status=report.status,
                          message=report.message, queueing_ms=report.queueing_ms,
                          execution_ms=report.execution_ms)
        self._unstarted.pop(job.request_id, None)
        if report.status == "executing":
            timer = asyncio.get_running_loop().call_later(EXECUTING_DELAY, self._executing_due,
                                                          job.request_id)
            self._executing[job.request_id] = (timer, frame)
            return
        self._executing_due(job.request_id)
        self._send_soon(frame, 6, job.request_id)

    def _executing_due(self, request_id: str) -> None:
        pending = self._executing.pop(request_id, None)
        if pending is not None:
            pending[0].cancel()
            self._send_soon(pending[1], 6, request_id)

    async def result(self, job: Job, status_code: int, message: str, data: bytes) -> None:
        self._unstarted.pop(job.request_id, None)
        self._executing_due(job.request_id)  # "executing" always precedes the result
        self._send_soon(lp.Result(request_id=job.request_id, status_code=status_code,
                                   message=message, data=data), 10, job.request_id)

    async def ack(self, job: Job) -> None:
        self._send_soon(lp.Ack(request_id=job.request_id), 6, job.request_id)

    async def chunk(self, job: Job, seq: int, data: bytes) -> None:
        self._send_soon(lp.Chunk(request_id=job.request_id, seq=seq, data=data), 3,
                         job.request_id)

    async def heartbeat(self, request_ids: list[str]) -> HeartbeatReply:
        if not await self._send(lp.Heartbeat(request_ids=request_ids), 1):
            raise AgentUnavailable("heartbeat could not be sent over the link")
        cancel = sorted(self._cancels)
        self._cancels.clear()
        return HeartbeatReply(cancel=cancel)

    async def close(self) -> None:
        """Send what is queued and, to a gateway that confirms, see it confirmed
        (linking again if the link is down), for up to ``CLOSE_WAIT`` s; then close."""
        for request_id in list(self._executing):
            self._executing_due(request_id)
        try:
            async with asyncio.timeout(CLOSE_WAIT):
                await self._writer.join()
                await self._all_stored()
        except TimeoutError:
            pass
        if len(self.unconfirmed):
            logger.error(f"closing the agent link with {len(self.unconfirmed)} frame(s) the "
                         f"gateway has not confirmed, of request(s) "
                         f"{_ids(list(self.unconfirmed.frames))}")
        self._closed = True
        await self._writer.close()  # a resend still waiting for a link ends here
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await asyncio.gather(*self._closing, return_exceptions=True)

    async def _all_stored(self) -> None:
        backoff = Backoff(RESEND_RETRY)
        while len(self.unconfirmed) and self.unconfirmed.confirming:
            try:
                await self._live()  # a new link writes what is kept first
            except AgentUnavailable:
                await backoff.sleep()
                continue
            assert self._reader is not None
            stored = asyncio.ensure_future(self.unconfirmed.none.wait())
            try:  # until confirmed, or the link is lost (then again)
                await asyncio.wait((stored, self._reader), return_when=asyncio.FIRST_COMPLETED)
            finally:
                stored.cancel()
