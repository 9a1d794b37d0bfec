"""The multiplexed link, worker side: the Transport interface over one WebSocket.

Jobs arrive as ``Dispatch`` frames against credits this side grants in
``pull``; results, metrics, chunks, acks and heartbeats go back as frames
(``spirit_gpu.protocol.link``). On a lost link it reconnects on the next call;
jobs dispatched but not yet handed to the worker loop are dropped (the gateway
redelivers them when their lease runs out), running jobs report on the new link.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

import aiohttp
import msgspec

from spirit_gpu.log import logger
from spirit_gpu.net import wsio
from spirit_gpu.protocol import agent
from spirit_gpu.protocol import link as lp
from spirit_gpu.protocol.agent import DEFAULT_TTL_MS, HeartbeatReply, StatusMetric
from spirit_gpu.supervisor.jobs import Job, now_ms
from spirit_gpu.supervisor.transports.base import PullResult
from spirit_gpu.supervisor.transports.plain import AgentUnavailable, Outage

PULL_WAIT = 1.0  # seconds pull() waits for a dispatch before answering []
# A job's "executing" metric waits this long for its result, so a short job's
# metrics, result and ack share one message; a longer job reports it on time.
EXECUTING_DELAY = 0.05
CONNECT_TIMEOUT = 10.0


def job_from_dispatch(d: lp.Dispatch) -> Job:
    return Job(request_id=d.request_id, mode=d.mode, webhook=d.webhook,
               enqueue_at=d.enqueue_at, create_at=d.create_at,
               ttl_ms=d.ttl_ms or DEFAULT_TTL_MS, body=d.body, received_at=now_ms())


_Group = list[tuple[lp.Frame, asyncio.Future[bool]]]


def _settle(group: _Group, ok: bool) -> None:
    for _, done in group:
        if not done.done():
            done.set_result(ok)


class LinkTransport:
    batched_pulls = True  # one pull() may hand over many jobs
    instant_metrics = True  # metric() only queues a frame and returns

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
        self._out: _Group = []  # this loop turn's frames
        self._writes: set[asyncio.Task[Any]] = set()
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

    def _queue(self, frame: lp.Frame) -> asyncio.Future[bool]:
        """Send with the rest of this loop turn's frames; the future says if it went out."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append((frame, done))
        return done

    def _flush(self) -> None:
        out, self._out = self._out, []
        if not out:
            return
        groups = [out] if self._batches else [[item] for item in out]
        for group in groups:
            ws = self._ws
            if ws is not None and not ws.closed and not self._writes:
                self._write_now(ws, group)  # the usual case: written here, no task
                continue
            task = asyncio.ensure_future(self._write(group))  # after a reconnect
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    def _write_now(self, ws: aiohttp.ClientWebSocketResponse, group: _Group) -> None:
        coro = ws.send_bytes(lp.encode_many([frame for frame, _ in group]))
        try:
            done, waiting = wsio.start(coro)
        except (aiohttp.ClientError, ConnectionError, RuntimeError):
            _settle(group, False)
            return
        if done:
            _settle(group, True)
            return
        task = asyncio.ensure_future(self._finish(coro, waiting, group))  # link pushes back
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _finish(self, coro: wsio.SendCoro, waiting: Any, group: _Group) -> None:
        try:
            await wsio.finish(coro, waiting)
            ok = True
        except (aiohttp.ClientError, ConnectionError, RuntimeError):
            ok = False
        _settle(group, ok)

    async def _write(self, group: _Group) -> None:
        try:
            ws = await self._live()
            await ws.send_bytes(lp.encode_many([frame for frame, _ in group]))
            ok = True
        except (AgentUnavailable, aiohttp.ClientError, ConnectionError, RuntimeError):
            ok = False
        _settle(group, ok)

    def _send_soon(self, frame: lp.Frame, attempts: int, request_id: str = "") -> None:
        """Queue without waiting (frames of one turn share a message); retry if it failed."""
        def sent(done: asyncio.Future[bool]) -> None:
            if not done.result():
                task = asyncio.ensure_future(self._retry(frame, attempts - 1, request_id))
                self._writes.add(task)
                task.add_done_callback(self._writes.discard)
        self._queue(frame).add_done_callback(sent)

    async def _send(self, frame: lp.Frame, attempts: int, request_id: str = "") -> bool:
        return await self._queue(frame) or await self._retry(frame, attempts - 1, request_id)

    async def _retry(self, frame: lp.Frame, attempts: int, request_id: str) -> bool:
        data = lp.encode(frame)
        delay = 0.1
        error: object = "the link is down"
        for _ in range(attempts):
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            try:
                ws = await self._live()
                await ws.send_bytes(data)
                return True
            except (AgentUnavailable, aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
                error = exc
        logger.error(f"giving up on sending {type(frame).__name__.lower()} over the link after "
                     f"{attempts + 1} attempts: {error}", request_id=request_id)
        return False

    # --- Transport ------------------------------------------------------------------
    async def pull(self, limit: int) -> PullResult:
        ws = await self._live()
        want = limit - len(self._buffer) - self._outstanding
        if want < 0:
            want = max(want, -self._outstanding)
        # top credits up in bulk (one frame per many jobs), never leaving none
        if want > 0 and want >= max(1, limit // 2) or want < 0:
            self._outstanding += want
            self._queue(lp.Credit(n=want))  # a lost link resets the credits
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

    async def metric(self, job: Job, status: StatusMetric) -> None:
        frame = lp.Metric(request_id=job.request_id, status=status.status,
                          message=status.message, queueing_ms=status.queueingDuration,
                          execution_ms=status.executionDuration)
        if status.status == "executing":
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
        self._flush()
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        self._closed = True
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
