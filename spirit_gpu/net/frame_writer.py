"""Both ends of the proxy link: the per-turn batching writer for proxy frames."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.client_ws import ClientWebSocketResponse

from spirit_gpu.log import logger
from spirit_gpu.net.batch_writer import BatchWriter, ws_sink
from spirit_gpu.protocol.proxy import LinkFrame, encode_frames, payload_size

HIGH_WATER = 4 * 1024 * 1024  # queued bytes before a producer waits
_closing: set[asyncio.Task[Any]] = set()


class FrameWriter:
    """Queues frames; everything queued in a loop turn goes out as one message.

    ``send`` never blocks (it is called from many exchanges); producers of bulk
    data call ``wait_drained`` so that a slow link holds them back. A failed
    write closes the writer (the link is gone); a frame that cannot be encoded
    is a bug: it is logged and the link is closed.
    """

    def __init__(self, ws: web.WebSocketResponse | ClientWebSocketResponse) -> None:
        self._ws = ws
        self._writer: BatchWriter[LinkFrame] = BatchWriter(
            encode_frames, ws_sink(ws.send_bytes), size=payload_size, high_water=HIGH_WATER,
            on_error=self._failed)

    @property
    def closed(self) -> bool:
        return self._writer.closed

    def send(self, frame: LinkFrame) -> None:
        self._writer.send(frame)

    async def wait_drained(self) -> None:
        await self._writer.wait_drained()

    def _failed(self, frames: list[LinkFrame], exc: Exception) -> None:
        self._writer.abort()
        if not isinstance(exc, ConnectionError | RuntimeError):  # a frame that cannot be
            logger.error(f"proxy link writer failed: {exc!r}", exc_info=True)  # encoded: a bug
            task = asyncio.ensure_future(self._ws.close())  # end the link
            _closing.add(task)
            task.add_done_callback(_closing.discard)

    async def close(self) -> None:
        await self._writer.close()
