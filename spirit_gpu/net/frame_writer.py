"""Both ends of the proxy link: frame coding and a writer that batches per loop turn."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiohttp import web
from aiohttp.client_ws import ClientWebSocketResponse

from spirit_gpu.log import logger
from spirit_gpu.net import wsio
from spirit_gpu.protocol.proxy import LinkFrame, encode_frames, payload_size

HIGH_WATER = 4 * 1024 * 1024  # queued bytes before a producer waits
_closing: set[asyncio.Task[Any]] = set()


class FrameWriter:
    """Queues frames; everything queued in a loop turn goes out as one message.

    The first ``send`` of a turn schedules one flush callback (no writer task
    to wake): it encodes the batch and writes it at once. Only when the link
    pushes back (the transport's buffer is full) does a task finish that write;
    frames queued meanwhile wait for it and then go out together.
    ``send`` never blocks (it is called from many exchanges); producers of bulk
    data call ``wait_drained`` so that a slow link holds them back.
    """

    def __init__(self, ws: web.WebSocketResponse | ClientWebSocketResponse) -> None:
        self._ws = ws
        self._loop = asyncio.get_running_loop()
        self._pending: list[LinkFrame] = []
        self._pending_bytes = 0
        self._scheduled = False
        self._blocked: asyncio.Task[None] | None = None  # finishing a write the link held back
        self._drained = asyncio.Event()
        self._drained.set()
        self.closed = False

    def send(self, frame: LinkFrame) -> None:
        if self.closed:
            return
        self._pending.append(frame)
        size = payload_size(frame)
        if size:
            self._pending_bytes += size
            if self._pending_bytes > HIGH_WATER:
                self._drained.clear()
        if not self._scheduled and self._blocked is None:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    async def wait_drained(self) -> None:
        await self._drained.wait()

    def _flush(self) -> None:
        self._scheduled = False
        if self.closed or self._blocked is not None or not self._pending:
            return
        frames, self._pending, self._pending_bytes = self._pending, [], 0
        try:
            coro = self._ws.send_bytes(encode_frames(frames))
            done, waiting = wsio.start(coro)  # uncompressed: usually written at once
        except Exception as exc:
            self._failed(exc)
            return
        if done:
            self._drained.set()
            return
        self._blocked = asyncio.ensure_future(self._finish(coro, waiting))

    async def _finish(self, coro: wsio.SendCoro, waiting: Any) -> None:
        """Drive a write that waits for the link to drain, then send what queued meanwhile."""
        try:
            await wsio.finish(coro, waiting)
        except Exception as exc:
            self._failed(exc)
            return
        finally:
            self._blocked = None
        if self._pending:
            self._flush()
        else:
            self._drained.set()

    def _failed(self, exc: Exception) -> None:
        self.closed = True
        self._drained.set()
        self._pending = []
        if not isinstance(exc, ConnectionError | RuntimeError):  # a frame that cannot be
            logger.error(f"proxy link writer failed: {exc!r}", exc_info=True)  # encoded: a bug
            task = asyncio.ensure_future(self._ws.close())  # end the link
            _closing.add(task)
            task.add_done_callback(_closing.discard)

    async def close(self) -> None:
        self.closed = True
        self._drained.set()
        if self._blocked is not None:
            self._blocked.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._blocked
