"""The multiplexed link, worker side: the Transport interface over one WebSocket.

Jobs arrive as ``Dispatch`` frames against credits this side grants in
``pull``; results, metrics, chunks, acks and heartbeats go back as frames
(``spirit_gpu.protocol.link``). On a lost link it reconnects on the next call;
jobs dispatched but not yet handed to the worker loop are dropped (the gateway
redelivers them when their lease runs out), running jobs report on the new link.

Outgoing frames go through one ``BatchWriter``: a loop turn's frames travel as
one message, and a message that could not be sent is retried whole, in order,
before anything queued after it (a result never overtakes its ``executing``
metric, an ack never its result). Each frame has its own number of tries.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable

import aiohttp
import msgspec

from spirit_gpu.log import logger
from spirit_gpu.net import wsio
from spirit_gpu.net.batch_writer import BatchWriter
from spirit_gpu.protocol import agent
from spirit_gpu.protocol import link as lp
from spirit_gpu.protocol.agent import DEFAULT_TTL_MS, HeartbeatReply
from spirit_gpu.retry import Backoff, RetryPolicy
from spirit_gpu.supervisor.jobs import Job, StatusReport, now_ms
from spirit_gpu.supervisor.transports.base import (
    AgentUnavailable,
    Capabilities,
    Outage,
    PullResult,
)

PULL_WAIT = 1.0  # seconds pull() waits for a dispatch before answering []
# A job's "executing" metric waits this long for its result, so a short job's
# metrics, result and ack share one message; a longer job reports it on time.
EXECUTING_DELAY = 0.05
CONNECT_TIMEOUT = 10.0
# a message the link did not take is retried with this backoff; how many tries a
# frame gets is its own (a result 10, metrics and acks 6, chunks 3, heartbeats 1)
RESEND_RETRY = RetryPolicy(first=0.1, factor=2.0, max_delay=5.0)
_SEND_ERRORS = (AgentUnavailable, aiohttp.ClientError, ConnectionError, RuntimeError)


def job_from_dispatch(d: lp.Dispatch) -> Job:
    return Job(request_id=d.request_id, mode=d.mode, webhook=d.webhook,
               enqueue_at=d.enqueue_at, create_at=d.create_at,
               ttl_ms=d.ttl_ms or DEFAULT_TTL_MS, body=d.body, received_at=now_ms())


class _Out:
    """A frame waiting to go out, with the tries it has left."""

    __slots__ = ("frame", "tries", "done", "request_id")

    def __init__(self, frame: lp.Frame, tries: int, request_id: str,
                 done: asyncio.Future[bool] | None) -> None:
        self.frame = frame
        self.tries = tries
        self.request_id = request_id
        self.done = done


def _encode(items: list[_Out]) -> bytes:
    return lp.encode_many([o.frame for o in items])


def _settle(items: list[_Out], ok: bool) -> None:
    for o in items:
        if o.done is not None and not o.done.done():
            o.done.set_result(ok)


def _sent(items: list[_Out]) -> None:
    _settle(items, True)


class LinkTransport:
    capabilities = Capabilities(batched_pulls=True, instant_metrics=True)

    def __init__(self, session: aiohttp.ClientSession, agent_url: str, token: str = "") -> None:
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
        self._writer: BatchWriter[_Out] = BatchWriter(
            _encode, self._sink, max_batch=1, on_error=self._resend, on_sent=_sent)
        self._batches = False  # the gateway reads Batch messages
        self._outstanding = 0  # credits granted and not yet used by a dispatch
        self._executing: dict[str, tuple[asyncio.TimerHandle, lp.Metric]] = {}
        self._cancels: set[str] = set()
        self._closed = False

    # --- connection --------------------------------------------------------------
    async def connect(self) -> None:
        """Open the link and read the gateway's Welcome; raises when either fails."""
        headers = dict(self.headers, **{lp.BATCH_HEADER: "1"})
        ws = await self.session.ws_connect(self.url, headers=headers, max_msg_size=0,
                                           timeout=aiohttp.ClientWSTimeout(ws_close=5.0))
        try:
            first = await ws.receive(timeout=CONNECT_TIMEOUT)
            if first.type != aiohttp.WSMsgType.BINARY:
                raise ConnectionError(f"link closed before the welcome ({first.type.name})")
            welcome = lp.decode(first.data)
            if not isinstance(welcome, lp.Welcome):
                raise ConnectionError(f"link opened with {type(welcome).__name__}, not Welcome")
        except BaseException:
            await ws.close()
            raise
        self.features = set(welcome.features)
        self._batches = "batch" in self.features
        self._writer.max_batch = 0 if self._batches else 1  # one message per frame
        self.lease_ms = welcome.lease_ms
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
                except (aiohttp.ClientError, OSError, TimeoutError, msgspec.DecodeError) as exc:
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
                    elif isinstance(frame, lp.Cancel):
                        self._cancels.update(frame.request_ids)
                        gone = set(frame.request_ids)
                        self._buffer = deque(j for j in self._buffer
                                             if j.request_id not in gone)
        finally:
            if self._ws is ws:
                self._ws = None
                self._buffer.clear()  # undelivered: the gateway redelivers them
                self._outstanding = 0
                while self._waiters:  # their pulls answer [] and reconnect next time
                    waiter = self._waiters.popleft()
                    if not waiter.done():
                        waiter.set_result(None)
                if not self._closed:
                    logger.warn("agent link lost; reconnecting on the next call")

    def _deliver(self, job: Job) -> None:
        """Hand a dispatched job to the oldest waiting pull, else buffer it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(job)
                return
        self._buffer.append(job)

    # --- sending ----------------------------------------------------------------
    def _sink(self, data: bytes) -> Awaitable[None] | None:
        ws = self._ws
        if ws is None or ws.closed:
            return self._send_when_up(data)  # the next call reconnects
        coro = ws.send_bytes(data)
        done, waiting = wsio.start(coro)  # the usual case: written here, no task
        return None if done else wsio.finish(coro, waiting)

    async def _send_when_up(self, data: bytes) -> None:
        ws = await self._live()
        await ws.send_bytes(data)

    async def _resend(self, items: list[_Out], error: Exception) -> None:
        """Retry a message that did not go out, whole and in order; the writer holds
        everything queued after it until this ends."""
        backoff = Backoff(RESEND_RETRY)
        while True:
            left = []
            for o in items:  # that try counted for every frame in it
                o.tries -= 1
                if o.tries > 0:
                    left.append(o)
                    continue
                _settle([o], False)
                if o.request_id:  # a job's report is lost: say so for each one
                    logger.error(f"giving up on sending {type(o.frame).__name__.lower()} "
                                 f"over the link: {error}", request_id=o.request_id)
            items = left
            if not items:
                return
            await backoff.sleep()
            try:
                ws = await self._live()
                if self._batches:
                    await ws.send_bytes(_encode(items))
                else:
                    for o in items:
                        await ws.send_bytes(lp.encode(o.frame))
            except _SEND_ERRORS as exc:
                error = exc
                continue
            _settle(items, True)
            return

    def _send_soon(self, frame: lp.Frame, tries: int, request_id: str = "") -> None:
        """Queue without waiting: frames of one loop turn share a message."""
        self._writer.send(_Out(frame, tries, request_id, None))

    async def _send(self, frame: lp.Frame, tries: int) -> bool:
        """Queue and wait until it went out (True) or was given up on (False)."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._writer.send(_Out(frame, tries, "", done))
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
        for request_id in list(self._executing):
            self._executing_due(request_id)
        await self._writer.join()
        self._closed = True
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
