"""A TCP relay on 127.0.0.1 between a linked worker and its gateway: the network
between them, made to fail on demand.

``swallow()``: from then on what the worker sends is read and dropped (bytes a
dying gateway, or a broken network, took and never handled), while the
gateway's answers still pass (``swallow(answers=True)``: the other way round);
``cut()`` ends every connection and passes bytes again. Nothing of ours is
replaced: both ends are the real worker link and the real gateway, on real
sockets.
"""

from __future__ import annotations

import asyncio
import contextlib

from tests.conftest import until


class Relay:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.swallowing: bool | None = None  # True: the worker's bytes, False: the gateway's
        self.swallowed = 0  # bytes dropped so far
        self.connections = 0  # connections the worker opened so far
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers |= {writer, up_writer}
        for task in (self._pump(reader, up_writer, upstream=True),
                     self._pump(up_reader, writer, upstream=False)):
            t = asyncio.ensure_future(task)
            self._pumps.add(t)
            t.add_done_callback(self._pumps.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    upstream: bool) -> None:
        try:
            while data := await reader.read(65536):
                if self.swallowing is upstream:
                    self.swallowed += len(data)
                    continue
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def swallow(self, answers: bool = False) -> None:
        self.swallowing = not answers

    async def swallowed_at_least(self, n: int) -> None:
        await until(lambda: self.swallowed >= n, 10, f"{n} bytes swallowed",
                    detail=lambda: f"{self.swallowed} bytes")

    async def cut(self) -> None:
        """End every connection (each end sees it closed), then pass bytes again."""
        for writer in list(self._writers):
            transport = writer.transport
            with contextlib.suppress(Exception):
                transport.abort()  # type: ignore[attr-defined]
        self._writers.clear()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        self.swallowing = None

    async def close(self) -> None:
        await self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
