"""Both ends of the proxy link: frame coding and a writer that batches per loop turn."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

import msgspec
from aiohttp import web
from aiohttp.client_ws import ClientWebSocketResponse

from spirit_gpu.log import logger
from spirit_gpu.supervisor.proxy_protocol import LinkData, LinkFrame

_encode = msgspec.msgpack.Encoder().encode
decode_frames = msgspec.msgpack.Decoder(list[LinkFrame]).decode
HIGH_WATER = 4 * 1024 * 1024  # queued bytes before a producer waits


def header_list(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """Headers as plain ``(str, str)`` pairs (aiohttp's keys are ``istr``)."""
    return [(str(k), v) for k, v in headers.items()]


class FrameWriter:
    """Queues frames; one task sends everything queued in a loop turn as one message.

    ``send`` never blocks (it is called from many exchanges); producers of bulk
    data call ``wait_drained`` so that a slow link holds them back.
    """

    def __init__(self, ws: web.WebSocketResponse | ClientWebSocketResponse) -> None:
        self._ws = ws
        self._pending: list[LinkFrame] = []
        self._pending_bytes = 0
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self.closed = False
        self._task = asyncio.create_task(self._run(), name="proxy-link-writer")

    def send(self, frame: LinkFrame) -> None:
        if self.closed:
            return
        self._pending.append(frame)
        if isinstance(frame, LinkData):
            self._pending_bytes += len(frame.data)
            if self._pending_bytes > HIGH_WATER:
                self._drained.clear()
        self._wake.set()

    async def wait_drained(self) -> None:
        await self._drained.wait()

    async def _run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                frames, self._pending, self._pending_bytes = self._pending, [], 0
                await self._ws.send_bytes(_encode(frames))
                self._drained.set()
        except (ConnectionError, RuntimeError):  # the link closed under us
            self.closed = True
            self._drained.set()
        except Exception as exc:  # a frame that cannot be encoded: a bug; end the link
            logger.error(f"proxy link writer failed: {exc!r}", exc_info=True)
            self.closed = True
            self._drained.set()
            await self._ws.close()

    async def close(self) -> None:
        self.closed = True
        self._drained.set()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
