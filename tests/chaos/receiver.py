"""A webhook receiver that misbehaves on purpose, and counts what reaches it.

Each request's webhook URL picks a behaviour:

* ``ok``: answers 200;
* ``flaky``: answers 500 to a request's first attempt, 200 to the next ones;
* ``fail``: always 500;
* ``hang``: never answers (until the receiver closes, then 500);
* ``refused``: a port bound but not listening: every connection is refused.

A webhook counts as *delivered* when the receiver answered it 200; a request
whose webhook is delivered twice is a duplicate.
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from aiohttp import web

MODES = ("ok", "flaky", "fail", "hang", "refused")


@dataclass
class Delivery:
    status_code: int  # the statusCode query parameter the sender put on it
    body: bytes


@dataclass
class Receiver:
    url: str = ""
    refused_url: str = ""
    attempts: Counter[str] = field(default_factory=Counter)  # per request id
    attempts_by_mode: Counter[str] = field(default_factory=Counter)
    delivered: defaultdict[str, list[Delivery]] = field(
        default_factory=lambda: defaultdict(list))
    last_arrival: float = 0.0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None
    _reserved: socket.socket | None = None

    def webhook(self, mode: str) -> str:
        return self.refused_url if mode == "refused" else f"{self.url}/{mode}"

    async def _receive(self, request: web.Request) -> web.Response:
        mode = request.match_info["mode"]
        rid = request.query.get("requestID", "")
        body = await request.read()
        self.attempts[rid] += 1
        self.attempts_by_mode[mode] += 1
        self.last_arrival = asyncio.get_running_loop().time()
        if mode == "hang":
            await self.release.wait()
            return web.Response(status=500, text="receiver closing")
        if mode == "fail" or (mode == "flaky" and self.attempts[rid] == 1):
            return web.Response(status=500, text="failing on purpose")
        try:
            code = int(request.query.get("statusCode", ""))
        except ValueError:
            code = -1
        self.delivered[rid].append(Delivery(code, body))
        return web.Response(text="ok")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook/{mode}", self._receive)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/hook"
        # bound, never listening: connections to it are refused, and no one else gets it
        self._reserved = socket.socket()
        self._reserved.bind(("127.0.0.1", 0))
        self.refused_url = f"http://127.0.0.1:{self._reserved.getsockname()[1]}/hook"

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._reserved is not None:
            self._reserved.close()

    def duplicates(self) -> dict[str, int]:
        return {rid: len(d) for rid, d in self.delivered.items() if len(d) > 1}
