"""The proxy listener: the worker's HTTP server in front of the local LLM server.

Every request is forwarded to ``base_url`` (method, path, query, headers minus
hop-by-hop and ``Auth``, body streamed) and the answer streamed back chunk by
chunk. ``/_spirit/proxy/metrics`` (never forwarded) reports in-flight requests
and latency. The server is aiohttp's low-level ``web.Server`` (no router, no
middleware chain: the path is one function) with handler cancellation on, so a
client that disconnects aborts the upstream request at once.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import os
import socket
import time
from collections import deque
from typing import Any

import aiohttp
from aiohttp import web

from spirit_gpu.log import logger
from spirit_gpu.net.relay import (
    HOP_BY_HOP,
    filter_pairs,
    proxy_error,
    relay,
    request_body,
)
from spirit_gpu.protocol.proxy import (
    CLIENT_AUTH_HEADER,
    REQUEST_ID_HEADER,
    WORKER_TOKEN_HEADER,
)
from spirit_gpu.supervisor.proxy.upstream import InvalidRequest, UpstreamPool

METRICS_PATH = "/_spirit/proxy/metrics"
NOT_READY = "worker not ready: check_start has not succeeded yet"
DROP = HOP_BY_HOP | {CLIENT_AUTH_HEADER.lower(), REQUEST_ID_HEADER.lower(),
                      WORKER_TOKEN_HEADER.lower()}
_ids = itertools.count(1)
_keys = itertools.count(1)
_prefix = f"{os.getpid():x}-{int(time.time()) & 0xFFFFFF:x}"


def new_request_id() -> str:
    return f"px-{_prefix}-{next(_ids)}"


class ProxyStats:
    """In-flight requests and latency of the last 1024 finished ones."""

    def __init__(self) -> None:
        self.inflight: dict[int, str] = {}  # a key per exchange -> its request id
        self.total = 0
        self.failed = 0
        self.cut = 0
        self.durations: deque[float] = deque(maxlen=1024)
        self.first_bytes: deque[float] = deque(maxlen=1024)

    def snapshot(self) -> dict[str, Any]:
        def quantiles(values: deque[float]) -> dict[str, float]:
            if not values:
                return {"p50": 0.0, "p99": 0.0, "max": 0.0}
            ordered = sorted(values)

            def pick(q: float) -> float:
                return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

            return {"p50": round(pick(0.5) * 1000, 3), "p99": round(pick(0.99) * 1000, 3),
                    "max": round(ordered[-1] * 1000, 3)}

        return {"inflight": len(self.inflight), "total": self.total, "failed": self.failed,
                "cut": self.cut, "duration_ms": quantiles(self.durations),
                "first_byte_ms": quantiles(self.first_bytes)}


class ProxyListener:
    """Listens on ``host:port`` and forwards to ``base_url``; ``ready`` gates traffic."""

    def __init__(self, base_url: str, host: str = "127.0.0.1", port: int = 0,
                 worker_token: str = "", advertise_url: str = "") -> None:
        self.base_url = base_url.rstrip("/")
        self.host = host
        self.port = port
        self.worker_token = worker_token
        self.advertise_url = advertise_url
        self.ready = False
        self.stats = ProxyStats()
        self._idle = asyncio.Event()
        self._idle.set()
        self._upstream: UpstreamPool | None = None
        self._runner: web.ServerRunner | None = None

    @property
    def url(self) -> str:
        """The URL the gateway should use to reach this listener."""
        if self.advertise_url:
            return self.advertise_url.rstrip("/")
        host = self.host
        if host in ("", "0.0.0.0", "::"):
            host = socket.gethostbyname(socket.gethostname())
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        self._upstream = UpstreamPool(self.base_url)
        server = web.Server(self._handle, handler_cancellation=True, access_log=None)
        self._runner = web.ServerRunner(server, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        sockets = self._runner.addresses
        if sockets and self.port == 0:
            self.port = int(sockets[0][1])
        logger.info(f"proxy listener on {self.host}:{self.port} forwarding to {self.base_url}")

    async def drain(self, grace: float) -> bool:
        """Wait up to ``grace`` seconds for in-flight requests; True when none are left."""
        if self._idle.is_set():
            return True
        logger.info(f"waiting up to {grace:g}s for {len(self.stats.inflight)} proxied "
                    "request(s) to finish")
        try:
            async with asyncio.timeout(grace):
                await self._idle.wait()
            return True
        except TimeoutError:
            logger.warn(f"{len(self.stats.inflight)} proxied request(s) still running at "
                        "shutdown; they are cut")
            return False

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._upstream is not None:
            await self._upstream.close()
            self._upstream = None

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path == METRICS_PATH:
            return web.json_response(self.stats.snapshot())
        path = request.path
        if self.worker_token and not hmac.compare_digest(
                request.headers.get(WORKER_TOKEN_HEADER, "").encode("utf-8", "surrogatepass"),
                self.worker_token.encode()):
            return proxy_error(path, 401, "invalid worker token")
        if not self.ready:
            return proxy_error(path, 503, NOT_READY)
        assert self._upstream is not None
        rid = request.headers.get(REQUEST_ID_HEADER) or new_request_id()
        key, started = self.begin(rid)
        status, nbytes, note = 0, 0, ""
        try:
            body = await request_body(request)
            if isinstance(body, aiohttp.StreamReader):
                body = body.iter_any()
            try:  # the path and query exactly as the client wrote them
                upstream = await self._upstream.request(
                    request.method, request.raw_path, filter_pairs(request.headers.items(), DROP),
                    body)
            except InvalidRequest as exc:
                status, note = 400, str(exc)
                return proxy_error(path, 400, note)
            except OSError as exc:
                status, note = 502, f"upstream {self.base_url} unreachable: {exc!r}"
                self.stats.failed += 1
                return proxy_error(path, 502, note)
            try:
                self.stats.first_bytes.append(time.monotonic() - started)
                status = upstream.status
                result = await relay(request, upstream, {REQUEST_ID_HEADER: rid})
                nbytes = result.nbytes
                if result.cut:
                    self.stats.cut += 1
                    note = f"cut ({result.cut}): {result.detail}"
                return result.response
            finally:
                upstream.close()  # unfinished: aborts the upstream request
        except asyncio.CancelledError:
            note = "client disconnected; upstream request aborted"
            self.stats.cut += 1
            raise
        finally:
            self.end(key, rid, started, request.method, request.path, status, nbytes, note)

    @property
    def upstream(self) -> UpstreamPool:
        assert self._upstream is not None, "listener not started"
        return self._upstream

    def begin(self, rid: str) -> tuple[int, float]:
        """Count a proxied request in flight: its key and start time."""
        key = next(_keys)
        self.stats.inflight[key] = rid
        self._idle.clear()
        return key, time.monotonic()

    def end(self, key: int, rid: str, started: float, method: str, path: str, status: int,
            nbytes: int, note: str) -> None:
        """Count it done, and log it (one line a request, with its id)."""
        stats = self.stats
        elapsed = time.monotonic() - started
        stats.total += 1
        stats.durations.append(elapsed)
        stats.inflight.pop(key, None)
        if not stats.inflight:
            self._idle.set()
        message = f"proxy {method} {path} -> {status} {elapsed * 1000:.1f} ms {nbytes} bytes"
        if note:
            logger.warn(f"{message}: {note}", request_id=rid)
        else:
            logger.info(message, request_id=rid)
