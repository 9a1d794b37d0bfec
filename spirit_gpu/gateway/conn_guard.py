"""Connection limits in front of aiohttp: a cap on open connections, a deadline for
every request head and for every request body, and a way for a handler to learn
that its client went away.

aiohttp's own idle timer does not cover a connection that never completes a
first request head in the versions we support (3.9+), so ``ConnGuard`` wraps the
protocol aiohttp makes for each connection. Only two things about aiohttp are
relied on, both public: the application (and so ``middleware``, installed
outermost) is called once a request head is complete, and ``request.transport``
is the connection's transport. A connection is:

* idle (from its opening, and again from the end of each handler): it must
  complete the next request head within ``head_timeout`` seconds, else it is
  closed. Time spent handing the previous response to the kernel does not
  count: while the write buffer is not empty the clock restarts.
* busy (a handler runs): its request body must be whole within
  ``body_timeout`` seconds of the head. Past that, reading the body raises
  ``BodyTimeout`` (the handler answers 408); a handler that does not react
  within ``CUT_GRACE`` seconds has its connection closed.

Past ``max_connections`` open connections, new ones are closed as soon as they
are accepted; one warning says when that starts (with the count) and one line
when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from spirit_gpu.log import logger

CUT_GRACE = 2.0  # seconds a handler has to answer a body timeout before the cut
FLUSH_CHECK = 1.0  # while a response is still being written, look again this often
FD_RESERVE = 256  # descriptors kept for what is not a client connection (storage, proxy pool)


class BodyTimeout(ConnectionError):
    """The request body did not arrive whole in time."""


def raise_fd_limit() -> int:
    """Raise the soft open-file limit to the hard one; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY:
        target = hard if soft != resource.RLIM_INFINITY else soft
    else:
        target = hard
    if target != soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def connection_cap(wanted: int, fd_limit: int) -> int:
    """``wanted``, lowered so that the connections and ``FD_RESERVE`` fit in ``fd_limit``."""
    if fd_limit == resource.RLIM_INFINITY or fd_limit <= 0:
        return wanted
    return max(1, min(wanted, fd_limit - FD_RESERVE))


class _Refused(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()  # type: ignore[attr-defined]


class _Conn(asyncio.Protocol):
    """One accepted connection: aiohttp's protocol inside, our clocks around it."""

    def __init__(self, guard: ConnGuard, inner: asyncio.Protocol) -> None:
        self.guard = guard
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.due = 0.0  # when the timer fires
        self.idle_since = 0.0
        self.request: web.BaseRequest | None = None  # while a handler runs
        self.head_at = 0.0
        self.body_cut = False
        self.on_lost: list[Callable[[], None]] = []

    # --- asyncio.Protocol: everything goes on to aiohttp ------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.guard.conns[transport] = self
        self.idle_since = self.guard.loop.time()
        self.arm(self.idle_since + self.guard.head_timeout)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            self.guard.conns.pop(self.transport, None)
        self.guard.closed()
        callbacks, self.on_lost = self.on_lost, []
        for callback in callbacks:
            callback()
        self.inner.connection_lost(exc)
        self.request = None

    # --- the clocks ----------------------------------------------------------------
    def arm(self, when: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.due = when
        self.timer = self.guard.loop.call_at(when, self.check)

    def check(self) -> None:
        self.timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        g = self.guard
        now = g.loop.time()
        request = self.request
        if request is not None:
            if request.content.is_eof():
                self.arm(now + g.head_timeout)  # a long handler: look again later
            elif self.body_cut:
                transport.close()  # the handler did not answer the body timeout
            elif now - self.head_at >= g.body_timeout:
                self.body_cut = True
                g.body_timeouts += 1
                request.content.set_exception(BodyTimeout(
                    f"request timeout: the body did not arrive within {g.body_timeout:g} s"))
                self.arm(now + CUT_GRACE)
            else:
                self.arm(self.head_at + g.body_timeout)
            return
        if transport.get_write_buffer_size():
            self.idle_since = now  # the last response is still going out
            self.arm(now + min(g.head_timeout, FLUSH_CHECK))
        elif now - self.idle_since >= g.head_timeout:
            g.head_timeouts += 1
            transport.close()
        else:
            self.arm(self.idle_since + g.head_timeout)


class ConnGuard:
    """Limits for one listening gateway; ``install`` it on the app, ``listen`` with it."""

    def __init__(self, head_timeout: float, body_timeout: float, max_connections: int) -> None:
        self.head_timeout = head_timeout
        self.body_timeout = body_timeout
        self.max_connections = max_connections
        self.loop = asyncio.get_running_loop()
        self.conns: dict[Any, _Conn] = {}  # transport -> connection
        self.open = 0
        self.refusing = False
        self.refused = 0  # in the current episode at the cap
        self.refused_total = 0
        self.head_timeouts = 0
        self.body_timeouts = 0

    def install(self, app: web.Application) -> None:
        """Put ``middleware`` first (before the app is frozen by its runner)."""
        app.middlewares.insert(0, self.middleware)
        app[GUARD_KEY] = self

    def protocol_factory(self, inner: Callable[[], asyncio.Protocol]) \
            -> Callable[[], asyncio.Protocol]:
        def make() -> asyncio.Protocol:
            if self.open >= self.max_connections:
                self._refuse()
                return _Refused()
            self.open += 1  # counted at accept, so a burst of accepts cannot overshoot
            return _Conn(self, inner())
        return make

    async def listen(self, runner: web.BaseRunner, host: str, port: int,
                     backlog: int = 128) -> asyncio.Server:
        """Accept connections for ``runner``'s application through this guard."""
        server = runner.server
        assert server is not None, "call runner.setup() first"
        return await self.loop.create_server(self.protocol_factory(server), host, port,
                                             reuse_address=True, backlog=backlog)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        conn = self.conns.get(request.transport)
        if conn is None:  # the connection already closed
            return await handler(request)
        conn.request = request
        conn.head_at = self.loop.time()
        conn.body_cut = False
        if not request.content.is_eof():
            conn.arm(conn.head_at + self.body_timeout)
        try:
            return await handler(request)
        finally:
            conn.request = None
            conn.idle_since = self.loop.time()  # the response follows; see _Conn.check
            if conn.transport is not None and conn.due > conn.idle_since + self.head_timeout:
                conn.arm(conn.idle_since + self.head_timeout)  # a body deadline was later

    def _refuse(self) -> None:
        self.refused += 1
        self.refused_total += 1
        if not self.refusing:
            self.refusing = True
            logger.warn(f"connection cap reached: {self.open} connections open, the limit is "
                        f"{self.max_connections} (--max-connections); new connections are "
                        "closed until some end")

    def closed(self) -> None:
        self.open -= 1
        if self.refusing and self.open < self.max_connections * 0.9:
            logger.info(f"connections below the cap again ({self.open} open); "
                        f"{self.refused} were refused while at the cap")
            self.refusing = False
            self.refused = 0


GUARD_KEY: web.AppKey[ConnGuard] = web.AppKey("spirit_conn_guard", ConnGuard)


def on_client_gone(request: web.Request, callback: Callable[[], None]) -> Callable[[], None]:
    """Call ``callback`` once if the client's connection closes before the returned
    function is called. Without a guard in front (an app run by a plain aiohttp
    site) nothing is watched."""
    guard = request.app.get(GUARD_KEY)
    if guard is None:
        return _nothing
    conn = guard.conns.get(request.transport)
    if conn is None or conn.transport is None or conn.transport.is_closing():
        guard.loop.call_soon(callback)
        return _nothing
    conn.on_lost.append(callback)

    def stop() -> None:
        with contextlib.suppress(ValueError):
            conn.on_lost.remove(callback)
    return stop


def _nothing() -> None:
    return None
