"""The embedded storage: everything in this process's memory, lost on restart."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from spirit_gpu.gateway.storage.base import (
    CANCELLED_CODE,
    CHUNK_OVERHEAD,
    EXECUTING,
    QUEUEING,
    CancelOutcome,
    ChunkEvent,
    EndEvent,
    NewRequest,
    RequestRecord,
    SidStats,
    Storage,
    is_shared_worker,
    status_for_code,
)


def now_ms() -> int:
    return int(time.time() * 1000)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


@dataclass(eq=False, slots=True)
class _Entry:
    """A request and who waits on it. Slots, and containers made only when used:
    the cyclic GC scans every retained request on a full collection, so each
    one should cost it a single object (the record itself is untracked)."""

    rec: RequestRecord
    # made only when someone waits: most requests are never watched this way
    done_waiters: list[asyncio.Future[None]] | None = None
    changed: asyncio.Event | None = None
    chunks: list[ChunkEvent] | None = None  # made by the first chunk
    seqs: set[int] | None = None
    chunk_bytes: int = 0
    renewed: float = 0.0  # monotonic time of the last sign of life about this request

    def notify(self) -> None:
        old, self.changed = self.changed, None
        if old is not None:
            old.set()

    def finished(self) -> None:
        waiters, self.done_waiters = self.done_waiters, None
        for fut in waiters or ():
            if not fut.done():
                fut.set_result(None)
        self.notify()


@dataclass(eq=False)
class _Sid:
    queue: deque[str] = field(default_factory=deque)  # lazily pruned: check status on pop
    queued: int = 0
    waiters: deque[tuple[asyncio.Future[RequestRecord], str]] = field(default_factory=deque)
    sequence: int = 0
    workers: dict[str, float] = field(default_factory=dict)  # worker -> last seen (monotonic)
    in_flight: set[str] = field(default_factory=set)
    had_workers: bool = False  # set when stale workers are forgotten


class MemoryStorage(Storage):
    def __init__(self, lease_seconds: float = 20.0, retention_seconds: float = 1800.0,
                 max_deliveries: int = 3, max_chunk_bytes: int = 10 * 1024 * 1024,
                 clock: Callable[[], float] | None = None) -> None:
        """``clock`` (seconds) replaces both the wall clock (record times) and the
        monotonic one (leases), so tests can step time instead of sleeping."""
        self._wall = clock or time.time
        self._mono = clock or time.monotonic
        self.lease = lease_seconds
        self.retention_ms = int(retention_seconds * 1000)
        self.max_deliveries = max_deliveries
        self.max_chunk_bytes = max_chunk_bytes
        self._entries: dict[str, _Entry] = {}
        self._stopping = False  # stop_waiting() was called
        self._sids: dict[str, _Sid] = {}
        self._finished: deque[tuple[int, str]] = deque()  # (finished_at, id), for retention

    # --- helpers --------------------------------------------------------------
    def _now_ms(self) -> int:
        return int(self._wall() * 1000)

    def _sid(self, sid: str) -> _Sid:
        s = self._sids.get(sid)
        if s is None:
            s = self._sids[sid] = _Sid()
        return s

    def _entry(self, sid: str, request_id: str) -> _Entry | None:
        e = self._entries.get(request_id)
        return e if e is not None and e.rec.sid == sid else None

    def _end(self, e: _Entry, status_code: int, message: str, result: bytes | None,
             by_gateway: bool) -> bool:
        rec = e.rec
        if rec.terminal:
            return False
        s = self._sid(rec.sid)
        if rec.delivered:
            s.in_flight.discard(rec.request_id)
        else:
            s.queued -= 1
        rec.status = status_for_code(status_code)
        rec.status_code = status_code
        rec.message = message
        rec.result = result
        rec.finished_at = self._now_ms()
        rec.ended_by_gateway = by_gateway
        self._finished.append((rec.finished_at, rec.request_id))
        e.finished()
        if self.on_finish is not None:
            self.on_finish(rec)
        return True

    def _expired(self, rec: RequestRecord, at_ms: int) -> bool:
        return at_ms - rec.enqueued_at > rec.ttl_ms

    def _expire(self, e: _Entry) -> None:
        self._end(e, 408, "request timeout: queued longer than its ttl "
                  f"({e.rec.ttl_ms} ms)", None, by_gateway=True)

    def _deliver(self, s: _Sid, e: _Entry, worker: str) -> RequestRecord:
        rec = e.rec
        rec.delivered = True
        rec.holder = worker
        rec.deliveries += 1
        e.renewed = self._mono()
        s.queued -= 1
        s.in_flight.add(rec.request_id)
        return rec

    def _offer(self, s: _Sid, e: _Entry, front: bool = False) -> None:
        """Hand a queued entry to a waiting worker, or keep it in the queue."""
        while s.waiters:
            fut, worker = s.waiters.popleft()
            if not fut.done():
                fut.set_result(self._deliver(s, e, worker))
                return
        if front:
            s.queue.appendleft(e.rec.request_id)
        else:
            s.queue.append(e.rec.request_id)

    def _pop(self, s: _Sid, worker: str) -> RequestRecord | None:
        at = self._now_ms()
        while s.queue:
            e = self._entries.get(s.queue.popleft())
            if e is None or e.rec.status != QUEUEING or e.rec.delivered:
                continue
            if self._expired(e.rec, at):
                self._expire(e)
                continue
            return self._deliver(s, e, worker)
        return None

    # --- public API side ---------------------------------------------------------
    async def submit(self, req: NewRequest) -> RequestRecord:
        s = self._sid(req.sid)
        s.sequence += 1
        at = self._now_ms()
        rec = RequestRecord(request_id=str(uuid.uuid4()), sid=req.sid, mode=req.mode,
                            sequence=s.sequence, body=req.body, webhook=req.webhook,
                            created_at=at, enqueued_at=at, ttl_ms=req.ttl_ms)
        e = _Entry(rec)
        self._entries[rec.request_id] = e
        s.queued += 1
        self._offer(s, e)
        return rec

    async def get(self, sid: str, request_id: str) -> RequestRecord | None:
        e = self._entry(sid, request_id)
        return e.rec if e is not None else None

    async def wait_done(self, sid: str, request_id: str, wait: float) -> RequestRecord | None:
        e = self._entry(sid, request_id)
        if e is None:
            return None
        if not e.rec.terminal and not self._stopping:
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()
            if e.done_waiters is None:
                e.done_waiters = []
            e.done_waiters.append(fut)
            timer = loop.call_later(wait, _wake, fut)  # lighter than asyncio.timeout
            try:
                await fut
            finally:
                timer.cancel()
                if not e.rec.terminal and e.done_waiters is not None and fut in e.done_waiters:
                    e.done_waiters.remove(fut)
            if not e.rec.terminal:
                return None
        return e.rec

    def stop_waiting(self) -> None:
        self._stopping = True
        for e in list(self._entries.values()):  # (once, at shutdown)
            for fut in e.done_waiters or ():
                _wake(fut)
        for queue in self._sids.values():  # workers' long-polls: no job
            for taker, _ in list(queue.waiters):
                taker.cancel()

    async def stream(self, sid: str, request_id: str) -> AsyncIterator[ChunkEvent | EndEvent]:
        e = self._entry(sid, request_id)
        if e is None:
            return
        i = 0
        while True:
            while e.chunks is not None and i < len(e.chunks):
                yield e.chunks[i]
                i += 1
            if e.rec.terminal:
                yield EndEvent(status_code=e.rec.status_code, status=e.rec.status)
                return
            if e.changed is None:
                e.changed = asyncio.Event()
            await e.changed.wait()

    async def cancel(self, sid: str, request_id: str, sequence: int | None,
                     code: int = CANCELLED_CODE, message: str = "cancelled") -> CancelOutcome:
        e = self._entry(sid, request_id)
        if e is None:
            return CancelOutcome.NOT_FOUND
        if sequence is not None and sequence != e.rec.sequence:
            return CancelOutcome.SEQUENCE_MISMATCH
        if e.rec.terminal:
            return CancelOutcome.ALREADY_FINISHED
        running = e.rec.delivered
        self._end(e, code, message, None, by_gateway=True)
        return CancelOutcome.CANCELLED_RUNNING if running else CancelOutcome.CANCELLED_QUEUED

    async def clean_queued(self, sid: str, mode: str) -> list[str]:
        s = self._sid(sid)
        cleaned: list[str] = []
        for request_id in list(s.queue):
            e = self._entries.get(request_id)
            if (e is not None and e.rec.mode == mode and e.rec.status == QUEUEING
                    and not e.rec.delivered):
                self._end(e, CANCELLED_CODE, "cancelled: queue cleaned", None, by_gateway=True)
                cleaned.append(request_id)
        return cleaned

    async def queue_length(self, sid: str) -> int:
        s = self._sids.get(sid)
        return s.queued if s is not None else 0

    def _present(self, s: _Sid) -> int:
        at = self._mono()
        alive = {w for w, t in s.workers.items() if at - t <= self.lease}
        alive.update(w for fut, w in s.waiters if not fut.done())
        return len(alive)

    async def worker_count(self, sid: str) -> int:
        s = self._sids.get(sid)
        return self._present(s) if s is not None else 0

    async def has_worker(self, sid: str) -> bool:
        s = self._sids.get(sid)
        if s is None:
            return False
        if any(not fut.done() for fut, _ in s.waiters):
            return True
        at = self._mono()
        return any(at - t <= self.lease for t in s.workers.values())

    async def ever_had_worker(self, sid: str) -> bool | None:
        s = self._sids.get(sid)
        return s is not None and (s.had_workers or bool(s.workers) or bool(s.waiters))

    async def stats(self) -> list[SidStats]:
        return [SidStats(sid=sid, queued=s.queued, in_flight=len(s.in_flight),
                         workers=self._present(s)) for sid, s in sorted(self._sids.items())]

    # --- worker side ---------------------------------------------------------------
    async def take(self, sid: str, worker: str, wait: float) -> RequestRecord | None:
        s = self._sid(sid)
        s.workers[worker] = self._mono()
        rec = self._pop(s, worker)
        if rec is not None or wait <= 0 or self._stopping:
            return rec
        fut: asyncio.Future[RequestRecord] = asyncio.get_running_loop().create_future()
        waiter = (fut, worker)
        s.waiters.append(waiter)
        try:
            await asyncio.wait((fut,), timeout=wait)
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                await self.give_back(sid, fut.result().request_id)
            raise
        finally:
            if not fut.done():
                fut.cancel()
            if waiter in s.waiters:
                s.waiters.remove(waiter)
            s.workers[worker] = self._mono()
        return fut.result() if not fut.cancelled() else None

    async def give_back(self, sid: str, request_id: str) -> None:
        e = self._entry(sid, request_id)
        if e is None or e.rec.terminal or not e.rec.delivered or e.rec.started_at:
            return
        s = self._sid(sid)
        e.rec.delivered = False
        e.rec.holder = ""
        e.rec.deliveries = max(0, e.rec.deliveries - 1)
        s.in_flight.discard(request_id)
        s.queued += 1
        self._offer(s, e, front=True)

    async def touch_worker(self, sid: str, worker: str) -> None:
        self._sid(sid).workers[worker] = self._mono()

    async def mark_started(self, sid: str, request_id: str) -> bool:
        e = self._entry(sid, request_id)
        if e is None or e.rec.terminal:
            return False
        if not e.rec.started_at:
            e.rec.started_at = self._now_ms()
        if not e.rec.delivered:  # a result for a job we thought queued: it runs somewhere
            s = self._sid(sid)
            e.rec.delivered = True
            s.queued -= 1
            s.in_flight.add(request_id)
        e.rec.status = EXECUTING
        e.renewed = self._mono()
        return True

    async def finish(self, sid: str, request_id: str, status_code: int, message: str,
                     result: bytes | None) -> bool:
        e = self._entry(sid, request_id)
        if e is None:
            return False
        return self._end(e, status_code, message, result, by_gateway=False)

    async def annotate(self, sid: str, request_id: str, message: str) -> bool:
        e = self._entry(sid, request_id)
        if e is None or not e.rec.terminal:
            return False
        e.rec.message = message
        return True

    async def ack(self, sid: str, request_id: str) -> None:
        return None  # nothing to release in memory (JetStream: ack the message)

    async def add_chunk(self, sid: str, request_id: str, seq: int, data: bytes) -> bool:
        e = self._entry(sid, request_id)
        if e is None or e.rec.terminal:
            return False
        e.renewed = self._mono()
        cost = len(data) + CHUNK_OVERHEAD
        if e.seqs is None or e.chunks is None:
            e.seqs, e.chunks = set(), []
        if seq in e.seqs or e.chunk_bytes + cost > self.max_chunk_bytes:
            return False
        e.seqs.add(seq)
        e.chunk_bytes += cost
        e.chunks.append(ChunkEvent(seq=seq, data=data))
        e.notify()
        return True

    async def heartbeat(self, sid: str, worker: str, request_ids: list[str]) -> list[str]:
        at = self._mono()
        self._sid(sid).workers[worker] = at
        for request_id in request_ids:
            e = self._entry(sid, request_id)
            if e is not None:
                e.renewed = at
        return await self.cancels_for(sid, request_ids)

    async def cancels_for(self, sid: str, request_ids: list[str]) -> list[str]:
        out = []
        for request_id in request_ids:
            e = self._entry(sid, request_id)
            if e is not None and e.rec.ended_by_gateway and e.rec.delivered:
                out.append(request_id)
        return out

    # --- timers --------------------------------------------------------------------
    async def sweep(self) -> None:
        at_ms, at = self._now_ms(), self._mono()
        for s in self._sids.values():
            for request_id in list(s.queue):
                e = self._entries.get(request_id)
                if e is not None and e.rec.status == QUEUEING and not e.rec.delivered \
                        and self._expired(e.rec, at_ms):
                    self._expire(e)
            if len(s.queue) > 2 * s.queued + 64:  # drop ids of cancelled entries
                s.queue = deque(i for i in s.queue if self._queued(i))
            for request_id in list(s.in_flight):
                self._check_lease(s, self._entries[request_id], at)
            stale = [w for w, t in s.workers.items() if at - t > 3 * self.lease]
            for w in stale:
                del s.workers[w]
                s.had_workers = True
        while self._finished and at_ms - self._finished[0][0] > self.retention_ms:
            _, request_id = self._finished.popleft()
            self._entries.pop(request_id, None)

    def _queued(self, request_id: str) -> bool:
        e = self._entries.get(request_id)
        return e is not None and e.rec.status == QUEUEING and not e.rec.delivered

    def _check_lease(self, s: _Sid, e: _Entry, at: float) -> None:
        rec = e.rec
        last = e.renewed
        if not is_shared_worker(rec.holder):
            last = max(last, s.workers.get(rec.holder, 0.0))
        if at - last <= self.lease:
            return
        if rec.started_at == 0 and rec.deliveries < self.max_deliveries:
            rec.delivered = False
            rec.holder = ""
            s.in_flight.discard(rec.request_id)
            s.queued += 1
            self._offer(s, e, front=True)
            return
        what = "while executing" if rec.started_at else \
            f"after {rec.deliveries} deliveries that never started"
        self._end(e, 500, f"worker lost: no sign of life for {self.lease:g} s {what} "
                  "(the worker crashed, was killed or lost its connection)",
                  None, by_gateway=True)

    async def close(self) -> None:
        for s in self._sids.values():
            for fut, _ in s.waiters:
                if not fut.done():
                    fut.cancel()

