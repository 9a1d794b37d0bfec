"""The gateway end of the proxy link: one WebSocket per proxy worker, many exchanges.

``GatewayLink.open`` starts an exchange and returns its ``LinkStream``, whose
``get()`` yields the worker's frames in order. When the WebSocket closes every
open exchange gets a ``LinkFail`` with ``lost=True`` (the worker is gone).
A stream whose client reads slower than the worker writes is cut past
``MAX_BUFFERED`` bytes rather than growing without bound.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque

import aiohttp
from aiohttp import web

from spirit_gpu.net.frame_writer import FrameWriter
from spirit_gpu.protocol.proxy import (
    LinkCancel,
    LinkData,
    LinkEnd,
    LinkFail,
    LinkFrame,
    LinkHead,
    LinkOpen,
    decode_frames,
)

MAX_BUFFERED = 16 * 1024 * 1024


class LinkStream:
    __slots__ = ("id", "frames", "ended", "lost", "buffered", "_waiter")

    def __init__(self, exchange: int) -> None:
        self.id = exchange
        self.frames: deque[LinkFrame] = deque()
        self.ended = False  # LinkEnd or LinkFail received
        self.lost = False  # the link itself went away
        self.buffered = 0
        self._waiter: asyncio.Future[None] | None = None

    def feed(self, frame: LinkFrame) -> None:
        if self.ended:
            return
        if isinstance(frame, LinkData):
            self.buffered += len(frame.data)
            if self.buffered > MAX_BUFFERED:
                frame = LinkFail(self.id, "the client reads too slowly: stream cut")
        if isinstance(frame, LinkEnd | LinkFail):
            self.ended = True
        self.frames.append(frame)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> LinkFrame:
        while not self.frames:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        frame = self.frames.popleft()
        if isinstance(frame, LinkData):
            self.buffered -= len(frame.data)
        return frame

    def take_data(self, first: bytes) -> tuple[bytes, bool]:
        """``first`` and the data frames already here after it, as one piece (one write
        to the client instead of one per frame); True when a ``LinkEnd`` came next."""
        frames = self.frames
        if not frames:
            return first, False
        parts = [first]
        while frames and isinstance(frames[0], LinkData):
            data = frames.popleft().data  # type: ignore[union-attr]
            self.buffered -= len(data)
            parts.append(data)
        end = bool(frames) and isinstance(frames[0], LinkEnd)
        if end:
            frames.popleft()
        return (b"".join(parts) if len(parts) > 1 else first), end


class LinkBroken(ConnectionError):
    """The worker failed the exchange after its head (``LinkFail``), or its link went away."""


class LinkAnswer:
    """A worker's answer on a link stream, after its ``LinkHead``, as ``relay`` reads it."""

    __slots__ = ("stream", "status", "reason", "headers", "content_length", "_done")

    def __init__(self, stream: LinkStream, head: LinkHead) -> None:
        self.stream = stream
        self.status = head.status
        self.reason = head.reason
        self.headers = head.headers
        self.content_length: int | None = None  # a stream's end is known by LinkEnd
        self._done = False

    @property
    def complete(self) -> bool:
        if self._done:
            return True
        frames = self.stream.frames
        return self.stream.ended and bool(frames) and isinstance(frames[-1], LinkEnd)

    @property
    def pending(self) -> bool:
        frames = self.stream.frames
        return bool(frames) and isinstance(frames[0], LinkData)

    async def read(self) -> bytes:
        """The data frames that are here, as one piece; b"" after ``LinkEnd``."""
        if self._done:
            return b""
        frame = await self.stream.get()
        if isinstance(frame, LinkData):
            data, self._done = self.stream.take_data(frame.data)
            return data
        if isinstance(frame, LinkEnd):
            self._done = True
            return b""
        raise LinkBroken(getattr(frame, "message", repr(frame)))

    async def read_all(self) -> bytes:
        parts = []
        while chunk := await self.read():
            parts.append(chunk)
        return b"".join(parts)


class GatewayLink:
    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self.writer = FrameWriter(ws)
        self.streams: dict[int, LinkStream] = {}
        self._ids = itertools.count(1)
        self.opened = 0  # exchanges started on this link
        self.closed = False

    def open(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes,
             more: bool, request_id: str) -> LinkStream:
        stream = LinkStream(next(self._ids))
        self.streams[stream.id] = stream
        self.opened += 1
        self.writer.send(LinkOpen(stream.id, method, path, headers, body, more, request_id))
        return stream

    def send(self, frame: LinkFrame) -> None:
        self.writer.send(frame)

    def finish(self, stream: LinkStream) -> None:
        """Forget ``stream``; cancel the exchange at the worker unless it ended."""
        self.streams.pop(stream.id, None)
        if not stream.ended and not self.closed:
            self.writer.send(LinkCancel(stream.id))

    async def read_loop(self) -> None:
        """Dispatch frames until the WebSocket closes; then fail what is open."""
        try:
            async for msg in self.ws:
                if msg.type != aiohttp.WSMsgType.BINARY:
                    continue
                for frame in decode_frames(msg.data):
                    stream = self.streams.get(frame.id)
                    if stream is not None:
                        stream.feed(frame)
        finally:
            self.closed = True
            for stream in list(self.streams.values()):
                stream.lost = True
                stream.feed(LinkFail(stream.id, "the worker's proxy link closed"))
            await self.writer.close()
