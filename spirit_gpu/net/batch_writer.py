"""The one per-loop-turn batching writer: what a loop turn queues goes out in one write.

Used by the handler pipes (supervisor side), the worker's agent link, the
gateway's link end and both ends of the proxy link. The first ``send`` of a
turn schedules one flush callback (no writer task to wake); the flush encodes
the batch and hands it to the sink, which writes it at once in the usual case.
Only a sink that must wait (a WebSocket whose transport pushes back, a link
being re-established) leaves an awaitable; the writer then holds everything
queued meanwhile behind it, so the order of items is the order of ``send``.

A failed write goes to ``on_error(batch, exc)``: it may return an awaitable
that retries the batch (the writer stays held until it ends, so a retried batch
never overtakes nor is overtaken), or None to drop the batch. Without
``on_error`` a failure closes the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")
Sink = Callable[[bytes], Awaitable[None] | None]
OnError = Callable[[list[T], Exception], Awaitable[None] | None]


class BatchWriter(Generic[T]):
    """``encode(items) -> bytes`` then ``sink(bytes)``, once per loop turn.

    ``max_batch``: at most this many items per write (0: no limit); reaching it
    writes at once, so the reader starts on the first items while the rest are
    produced. ``size``/``high_water``: ``wait_drained`` holds producers back while
    more than ``high_water`` bytes are queued or a write is held up.
    """

    def __init__(self, encode: Callable[[list[T]], bytes], sink: Sink, *,
                 max_batch: int = 0, size: Callable[[T], int] | None = None,
                 high_water: int = 0, on_error: OnError[T] | None = None,
                 on_sent: Callable[[list[T]], None] | None = None) -> None:
        self._encode = encode
        self._sink = sink
        self.max_batch = max_batch
        self._size = size
        self._high_water = high_water
        self._on_error = on_error
        self._on_sent = on_sent
        # cached: asyncio.get_running_loop() costs a getpid() syscall on 3.11
        self._loop = asyncio.get_running_loop()
        self._pending: list[T] = []
        self._pending_bytes = 0
        self._scheduled = False
        self._blocked: asyncio.Future[None] | None = None  # a write or retry being finished
        self._drained = asyncio.Event()
        self._drained.set()
        self._idle = asyncio.Event()  # nothing queued, nothing being written
        self._idle.set()
        self.closed = False

    def send(self, item: T, now: bool = False) -> None:
        """Queue ``item``; ``now``: nothing else is in flight, write without waiting a turn."""
        if self.closed:
            return
        pending = self._pending
        if now and not pending and self._blocked is None:
            self._write([item])
            return
        pending.append(item)
        self._idle.clear()
        if self._size is not None:
            self._pending_bytes += self._size(item)
            if self._pending_bytes > self._high_water:
                self._drained.clear()
        if self._blocked is not None:
            return
        if self.max_batch and len(pending) >= self.max_batch:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush_due)

    def _flush_due(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        """Write what is queued now (in batches of at most ``max_batch``)."""
        while self._pending and self._blocked is None and not self.closed:
            if self.max_batch and len(self._pending) > self.max_batch:
                batch = self._pending[:self.max_batch]
                del self._pending[:self.max_batch]
            else:
                batch, self._pending = self._pending, []
            if self._size is not None:
                self._pending_bytes -= sum(self._size(item) for item in batch)
            self._write(batch)
        self._settle()

    def _settle(self) -> None:
        if self._blocked is None:
            if self._pending_bytes <= self._high_water:
                self._drained.set()
            if not self._pending:
                self._idle.set()

    def _write(self, batch: list[T]) -> None:
        try:
            waiting = self._sink(self._encode(batch))
        except Exception as exc:
            retry = self._failed(batch, exc)
            if retry is not None:
                self._hold(self._retrying(retry))
            return
        if waiting is not None:
            self._hold(self._finish(waiting, batch))
        elif self._on_sent is not None:
            self._on_sent(batch)

    def _hold(self, awaitable: Awaitable[None]) -> None:
        self._idle.clear()
        self._drained.clear()
        self._blocked = asyncio.ensure_future(awaitable)

    async def _finish(self, waiting: Awaitable[None], batch: list[T]) -> None:
        try:
            await waiting
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            retry = self._failed(batch, exc)
            if retry is not None:
                await retry
        else:
            if self._on_sent is not None:
                self._on_sent(batch)
        finally:
            self._blocked = None
        if not self.closed:
            self.flush()

    async def _retrying(self, retry: Awaitable[None]) -> None:
        try:
            await retry
        finally:
            self._blocked = None
        if not self.closed:
            self.flush()

    def _failed(self, batch: list[T], exc: Exception) -> Awaitable[None] | None:
        if self._on_error is not None:
            return self._on_error(batch, exc)
        self.abort()
        return None

    async def wait_drained(self) -> None:
        """Return once the queue is under its high-water mark and no write is held up."""
        await self._drained.wait()

    async def join(self) -> None:
        """Return once everything queued so far was written (or given up on)."""
        self.flush()
        while not self._idle.is_set() and not self.closed:
            await self._idle.wait()

    def abort(self) -> None:
        """Drop what is queued and take nothing more (a write under way still ends)."""
        self.closed = True
        self._pending = []
        self._pending_bytes = 0
        self._drained.set()
        self._idle.set()

    async def close(self) -> None:
        """Drop what is queued and stop a held-up write."""
        self.abort()
        blocked, self._blocked = self._blocked, None
        if blocked is not None:
            blocked.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await blocked


def ws_sink(send: Callable[[bytes], Any]) -> Sink:
    """A sink for an aiohttp WebSocket's ``send_bytes``: written at once unless it waits."""
    from spirit_gpu.net import wsio

    def sink(data: bytes) -> Awaitable[None] | None:
        coro = send(data)
        done, waiting = wsio.start(coro)
        return None if done else wsio.finish(coro, waiting)

    return sink
