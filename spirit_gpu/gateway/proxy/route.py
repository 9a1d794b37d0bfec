"""Proxy route: requests carrying ``Auth: <sid>-<api-key>`` go to a proxy-mode worker.

``install`` adds, to the gateway application:

* a middleware (outermost) that takes ``/api/*`` and ``/v1/*`` requests
  carrying an ``Auth`` header (``/v1/chat/*`` is inside ``/v1/*``): it checks
  the key (401, never forwarded), picks a ready worker of that serverless id
  (none: 503 "not enough gpu now") and streams the exchange both ways, over
  the worker's proxy link when it has one, else over HTTP to its listener;
  both ways end in the one ``net.relay.relay``. Requests without ``Auth``
  fall through to the public API untouched;
* the registration extension of the agent API (``registration.py``);
* ``proxy`` in the ``Spirit-Agent-Features`` header of every agent-API answer;
* one keep-alive client pool to the workers, opened and closed with the app.

``Auth`` is ``<sid>-<key>`` where both may contain ``-``: the key is the part
after the ``-`` that leaves a configured API key (when two configured keys
fit, one ending the other, the longer wins); the rest must be a valid
serverless id. Errors on ``/v1/*`` are OpenAI's shape, on ``/api/*``
``{"error": msg}`` (``net.relay.error_body``).

Limits: no response head within ``proxy_response_timeout`` -> 408; a transfer
still running ``proxy_transfer_timeout`` after its response started is cut
(the client sees an incomplete response). A worker whose connection fails is
dropped from routing until its next register beat; one that stops beating
leaves with its lease.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.web_urldispatcher import AbstractResource
from yarl import URL

from spirit_gpu.gateway.config import GatewayConfig
from spirit_gpu.gateway.conn_guard import on_client_gone
from spirit_gpu.gateway.httpio import is_serverless_id
from spirit_gpu.gateway.proxy import queued
from spirit_gpu.gateway.proxy.link import GatewayLink, LinkAnswer, LinkStream
from spirit_gpu.gateway.proxy.metrics import ProxyMetrics
from spirit_gpu.gateway.proxy.registration import Registration
from spirit_gpu.gateway.proxy.registry import REGISTRY_KEY, ProxyRegistry, ProxyWorker
from spirit_gpu.gateway.service import GATEWAY_KEY
from spirit_gpu.log import logger
from spirit_gpu.net.relay import (
    HOP_BY_HOP,
    ClientAnswer,
    Relayed,
    UpstreamAnswer,
    filter_pairs,
    new_session,
    proxy_error,
    relay,
    request_body,
)
from spirit_gpu.protocol.agent import FEATURES_HEADER, has_feature
from spirit_gpu.protocol.proxy import (
    CLIENT_AUTH_HEADER,
    FEATURE,
    REQUEST_ID_HEADER,
    WORKER_TOKEN_HEADER,
    LinkData,
    LinkEnd,
    LinkFail,
    LinkHead,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# dropped from what the worker gets; the request id is set anew (one value: ours)
_DROP = HOP_BY_HOP | {CLIENT_AUTH_HEADER.lower(), WORKER_TOKEN_HEADER.lower(),
                      REQUEST_ID_HEADER.lower()}
_PREFIXES = ("/api/", "/v1/")
_ids = itertools.count(1)
_id_prefix = f"gw-{os.getpid():x}"
# The worker's connection broke before its answer began: worth another try.
_RETRY_SAME = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
# The metrics' "code" of a response whose stream ended early.
_CUT_CODES = {"upstream": "cut_worker_failed", "deadline": "cut_transfer_limit",
              "client": "client_closed"}
AUTH_HELP = "expected 'Auth: <serverless id>-<api key>'"
Outcome = tuple[web.StreamResponse, str]  # the response, and why its stream was cut ("")


class ProxyRouter:
    """The gateway end of the proxy path (one per application)."""

    def __init__(self, config: GatewayConfig, metrics: ProxyMetrics | None = None) -> None:
        self.config = config
        self.registry = ProxyRegistry(lease_seconds=config.lease_seconds)
        self.metrics = metrics or ProxyMetrics()
        self.session: aiohttp.ClientSession | None = None
        self._keys = [key.encode() for key in config.api_keys]
        self._catch_alls: set[AbstractResource] = set()  # ours, skipped by ``not_proxied``
        # id(request) -> stop watching its client (``middleware``), until its answer began
        self._watching: dict[int, Callable[[], None]] = {}

    async def shutdown(self, app: web.Application) -> None:
        """Close the proxy links, so that the server's shutdown does not wait on them."""
        for link in self.registry.links():
            await link.ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"gateway stopping")

    async def lifetime(self, app: web.Application) -> AsyncIterator[None]:
        self.session = new_session()
        yield
        await self.session.close()

    # ---- routing -----------------------------------------------------------------

    def authorized_sid(self, auth: str) -> str | None:
        """The serverless id of an ``Auth`` value whose key is a configured one, else None.

        Every configured key is compared (in constant time for its length), so
        the time taken does not tell which one matched.
        """
        raw = auth.strip().encode("utf-8", "surrogatepass")
        found = -1
        for key in self._keys:
            at = len(raw) - len(key) - 1  # where the '-' before the key would be
            if (at > 0 and hmac.compare_digest(raw[at + 1:], key) and raw[at] == 0x2D
                    and len(key) > found):
                found = len(key)
        if found < 0:
            return None
        sid = raw[:len(raw) - found - 1].decode("utf-8", "surrogatepass")
        return sid if is_serverless_id(sid) else None

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        auth = request.headers.get(CLIENT_AUTH_HEADER)
        if auth is None or not request.path.startswith(_PREFIXES):
            return await handler(request)
        path = request.path
        rid = request.headers.get(REQUEST_ID_HEADER) or f"{_id_prefix}-{next(_ids)}"
        ids = {REQUEST_ID_HEADER: rid}  # on every answer, the gateway's refusals too
        if "-" not in auth.strip(" -"):
            return proxy_error(path, 401, f"invalid Auth header: {AUTH_HELP}", ids)
        sid = self.authorized_sid(auth)
        if sid is None:
            return proxy_error(path, 401, f"invalid api key or serverless id in the Auth "
                                          f"header ({AUTH_HELP})", ids)
        length = request.content_length
        if length is not None and length > self.config.max_body_bytes:
            return proxy_error(path, 400, "request body too large: the limit is "
                                          f"{self.config.max_body_bytes} bytes", ids)
        bad = _not_utf8(request.raw_path, request.headers.items())
        if bad:
            return proxy_error(path, 400, bad, ids)
        metrics = self.metrics
        metrics.begin(sid)
        code = "500"
        # a client that leaves before the answer begins (a whole generation, or a long
        # wait for the first token) ends the exchange now: the worker aborts the LLM
        # request (link: a cancel frame; HTTP: the closed connection), freeing the GPU.
        # Once the answer began, the relay's next write finds out (_answer_began).
        task = asyncio.current_task()
        gone = asyncio.Event()

        def client_gone() -> None:
            gone.set()
            if task is not None:
                task.cancel()
        stop_watching = self._watching[id(request)] = on_client_gone(request, client_gone)
        try:
            response, cut = await self.forward(request, sid, rid)
            code = _CUT_CODES.get(cut, "") or str(response.status)
            return response
        except asyncio.CancelledError:
            if not gone.is_set() or task is None:
                raise
            task.uncancel()  # our own cancel: nobody is left to answer
            code = _CUT_CODES["client"]
            logger.info(f"proxy {request.method} {path}: the client left before the answer "
                        "began; the exchange is cancelled")
            return web.Response(status=499)
        finally:
            stop_watching()
            self._watching.pop(id(request), None)
            metrics.end(sid, code)

    async def forward(self, request: web.Request, sid: str, rid: str) -> Outcome:
        """One proxied exchange with a ready worker of ``sid`` (another one if it fails
        before its answer began and the request can be sent again)."""
        headers = filter_pairs(request.headers.items(), _DROP)
        headers.append((REQUEST_ID_HEADER, rid))
        if self.config.worker_token:
            headers.append((WORKER_TOKEN_HEADER, self.config.worker_token))
        body = await request_body(request)
        exchange = _Exchange(request, sid, rid, headers, body,
                             asyncio.get_running_loop().time()
                             + self.config.proxy_response_timeout)
        tried: set[ProxyWorker] = set()
        while True:
            worker = self.registry.pick(sid, tried)
            if worker is None and not tried:  # no registered worker: try the queue
                queued_answer = await queued.forward(request, request.app[GATEWAY_KEY], sid,
                                                     rid, body, self.registry.answer_relay)
                if queued_answer is not None:
                    return queued_answer, ""
            if worker is None:
                return self._error(exchange, 503, "not enough gpu now"), ""
            worker.inflight += 1
            try:
                link = worker.link
                if link is not None and not link.closed:
                    outcome = await self._via_link(exchange, worker, link)
                else:
                    outcome = await self._via_http(exchange, worker)
            finally:
                worker.inflight -= 1
            if outcome is not None:
                return outcome
            tried.add(worker)

    def _error(self, exchange: _Exchange, status: int, message: str) -> web.Response:
        return proxy_error(exchange.request.path, status, message,
                           {REQUEST_ID_HEADER: exchange.rid})

    def _timed_out(self, exchange: _Exchange, worker: ProxyWorker) -> Outcome:
        request = exchange.request
        logger.warn(f"proxy {request.method} {request.path}: no response from worker "
                    f"{worker.worker_id} within {self.config.proxy_response_timeout:g}s",
                    request_id=exchange.rid)
        return self._error(exchange, 408, "request timeout: the worker did not start "
                                          "responding in time"), ""

    async def _relay(self, exchange: _Exchange, worker: ProxyWorker,
                     answer: UpstreamAnswer) -> Relayed:
        """The worker's answer, on to the client (the one relay of both ways)."""
        loop = asyncio.get_running_loop()
        self.metrics.response_started(exchange.sid, loop.time() - exchange.head_deadline
                                      + self.config.proxy_response_timeout)
        result = await relay(exchange.request, answer, {REQUEST_ID_HEADER: exchange.rid},
                             deadline=loop.time() + self.config.proxy_transfer_timeout)
        if result.cut:
            request = exchange.request
            logger.warn(f"proxy {request.method} {request.path} via {worker.worker_id} "
                        f"cut ({result.cut}): {result.detail}", request_id=exchange.rid)
        return result

    # ---- over HTTP to the worker's listener -------------------------------------------

    async def _via_http(self, exchange: _Exchange, worker: ProxyWorker) -> Outcome | None:
        """One exchange with ``worker``'s listener; None: try another worker."""
        assert self.session is not None, "proxy route used before the app started"
        request = exchange.request
        url = URL(worker.url + request.raw_path, encoded=True)
        try:
            async with asyncio.timeout_at(exchange.head_deadline):
                upstream = await self.session.request(
                    request.method, url, headers=exchange.headers, data=exchange.body,
                    allow_redirects=False)
        except TimeoutError:
            return self._timed_out(exchange, worker)
        except _RETRY_SAME as exc:
            if exchange.replayable and not exchange.retried_same:
                exchange.retried_same = True  # perhaps a stale keep-alive connection
                return await self._via_http(exchange, worker)
            return self._worker_failed(exchange, worker, f"worker failed: {exc!r}")
        except (aiohttp.ClientError, OSError) as exc:
            return self._worker_failed(exchange, worker, f"worker unreachable: {exc!r}")
        try:
            result = await self._relay(exchange, worker, ClientAnswer(upstream))
        finally:
            if upstream.content.is_eof():
                upstream.release()
            else:
                upstream.close()
        if result.cut == "upstream":
            self.registry.drop(worker, f"stream broke: {result.detail}")
        return result.response, result.cut

    def _worker_failed(self, exchange: _Exchange, worker: ProxyWorker,
                       message: str) -> Outcome | None:
        self.registry.drop(worker, message)
        if not exchange.replayable:
            return self._error(exchange, 502, message), ""
        return None

    # ---- over the worker's proxy link ---------------------------------------------------

    async def _via_link(self, exchange: _Exchange, worker: ProxyWorker,
                        link: GatewayLink) -> Outcome | None:
        """One exchange over ``worker``'s proxy link; None: try another worker."""
        request, body = exchange.request, exchange.body
        streamed = body is not None and not isinstance(body, bytes)
        stream: LinkStream | None = None
        pump: asyncio.Task[None] | None = None
        try:
            try:  # one timer: a link that does not drain takes no more bodies, then the head
                async with asyncio.timeout_at(exchange.head_deadline):
                    await link.writer.wait_drained()
                    stream = link.open(request.method, request.raw_path, exchange.headers,
                                       b"" if streamed or body is None else body, streamed,
                                       exchange.rid)
                    if streamed:
                        pump = asyncio.create_task(_pump_body(link, stream, body))
                    head = await stream.get()
            except TimeoutError:
                return self._timed_out(exchange, worker)
            if isinstance(head, LinkFail):
                if not stream.lost:
                    return self._error(exchange, 502, head.message), ""
                self.registry.drop(worker, head.message)
                if streamed:
                    return self._error(exchange, 502, f"worker failed: {head.message}"), ""
                return None  # the link died before an answer began
            assert isinstance(head, LinkHead), head
            result = await self._relay(exchange, worker, LinkAnswer(stream, head))
            if result.cut == "upstream" and stream.lost:
                self.registry.drop(worker, result.detail)
            return result.response, result.cut
        finally:
            if pump is not None:
                pump.cancel()
            if stream is not None:
                link.finish(stream)

    # ---- requests that are not proxied -------------------------------------------------

    async def not_proxied(self, request: web.Request) -> web.StreamResponse:
        """The catch-all routes' answer to a request without ``Auth``: what the router
        would say, and for a miss, that a proxy request needs ``Auth``.

        The catch-alls exist for speed (a miss in aiohttp's router costs an
        ``HTTPNotFound`` per request, ~50 µs, before the middleware sees it).
        """
        allowed: set[str] = set()
        for resource in request.app.router.resources():
            if resource in self._catch_alls:
                continue
            match, methods = await resource.resolve(request)
            if match is not None:  # cannot happen (it would have matched first); be safe
                return await match.handler(request)
            allowed |= methods
        if allowed:
            raise web.HTTPMethodNotAllowed(request.method, allowed)
        if "Authorization" in request.headers:
            message = (f"not found: {request.path} is not a path of the serverless API; a "
                       f"proxy-route request sends the header 'Auth: <serverless id>-<api "
                       f"key>' (not 'Authorization: Bearer')")
        else:
            message = (f"not found: {request.path}; a proxy-route request sends the header "
                       f"'Auth: <serverless id>-<api key>'")
        return proxy_error(request.path, 404, message)

    async def _answer_began(self, request: web.Request, response: web.StreamResponse) -> None:
        stop_watching = self._watching.get(id(request))
        if stop_watching is not None:
            stop_watching()

    def install(self, app: web.Application) -> None:
        app.middlewares.insert(0, self.middleware)
        app.cleanup_ctx.append(self.lifetime)
        app.on_shutdown.append(self.shutdown)
        app.on_response_prepare.append(_announce)
        app.on_response_prepare.append(self._answer_began)
        Registration(self.config, self.registry).install(app)
        for prefix in _PREFIXES:  # last, so every route of the public API matches first
            route = app.router.add_route("*", prefix + "{tail:.*}", self.not_proxied)
            self._catch_alls.add(route.resource)  # type: ignore[arg-type]


class _Exchange:
    """One client request on its way to a worker: what every try needs."""

    __slots__ = ("request", "sid", "rid", "headers", "body", "head_deadline", "replayable",
                 "retried_same")

    def __init__(self, request: web.Request, sid: str, rid: str,
                 headers: list[tuple[str, str]], body: Any, head_deadline: float) -> None:
        self.request = request
        self.sid = sid
        self.rid = rid
        self.headers = headers
        self.body = body
        self.head_deadline = head_deadline
        self.replayable = body is None or isinstance(body, bytes)
        self.retried_same = False


def _not_utf8(path: str, headers: Iterable[tuple[str, str]]) -> str:
    """What of the request cannot travel on (it is not UTF-8); "" when all can.

    aiohttp keeps bytes that are not UTF-8 as lone surrogates, which neither
    the proxy link's frames nor an HTTP client can encode.
    """
    if not path.isascii():
        try:
            path.encode()
        except UnicodeEncodeError:
            return "the request path is not valid UTF-8"
    for name, value in headers:
        if not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError:
                return f"header {name!r} is not valid UTF-8"
    return ""


async def _pump_body(link: GatewayLink, stream: LinkStream, body: aiohttp.StreamReader) -> None:
    """A streamed request body, on to the worker as LinkData frames, then LinkEnd."""
    try:
        while chunk := await body.readany():
            link.send(LinkData(stream.id, chunk))
            await link.writer.wait_drained()
        link.send(LinkEnd(stream.id))
    except (aiohttp.ClientError, OSError):  # the client went away mid-upload
        link.finish(stream)


async def _announce(request: web.Request, response: web.StreamResponse) -> None:
    """Add ``proxy`` to the features every agent-API answer names."""
    if request.path.startswith("/agent/"):
        current = response.headers.get(FEATURES_HEADER)
        if not has_feature(current, FEATURE):
            response.headers[FEATURES_HEADER] = f"{current},{FEATURE}" if current else FEATURE


ROUTER_KEY: web.AppKey[ProxyRouter] = web.AppKey("spirit_proxy_router", ProxyRouter)


def install(app: web.Application, config: GatewayConfig) -> None:
    """Mount the proxy route, the registration extension and the feature announcement."""
    gateway = app.get(GATEWAY_KEY)
    router = ProxyRouter(config, ProxyMetrics(gateway.metrics.registry if gateway else None,
                                              config.metrics_max_sids))
    app[ROUTER_KEY] = router
    app[REGISTRY_KEY] = router.registry
    router.install(app)
