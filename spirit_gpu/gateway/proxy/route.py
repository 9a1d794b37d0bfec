"""Proxy route: requests carrying ``Auth: <sid>-<api-key>`` go to a proxy-mode worker.

``install`` adds, to the gateway application:

* a middleware (outermost) that takes ``/api/*`` and ``/v1/*`` requests
  carrying an ``Auth`` header (``/v1/chat/*`` is inside ``/v1/*``): it checks
  the key (401, never forwarded), picks a ready worker of that serverless id
  (none: 503 "not enough gpu now") and streams the exchange both ways.
  Requests without ``Auth`` fall through to the public API untouched;
* the registration extension of the agent API under
  ``/agent/{sid}/apis/v1/proxy/`` (wire format in
  ``spirit_gpu.protocol.proxy``);
* ``proxy`` in the ``Spirit-Agent-Features`` header of every agent-API answer;
* one keep-alive client pool to the workers, opened and closed with the app.

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
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import msgspec
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from spirit_gpu.gateway.auth import bearer
from spirit_gpu.gateway.config import GatewayConfig
from spirit_gpu.gateway.proxy import queued
from spirit_gpu.gateway.proxy.link import GatewayLink, LinkStream
from spirit_gpu.gateway.proxy.metrics import ProxyMetrics
from spirit_gpu.gateway.proxy.registry import ProxyRegistry, ProxyWorker
from spirit_gpu.gateway.service import GATEWAY_KEY
from spirit_gpu.log import logger
from spirit_gpu.net.relay import (
    HOP_BY_HOP,
    ClientAnswer,
    LazyHeadResponse,
    cut_connection,
    filter_pairs,
    json_error,
    new_session,
    relay,
    request_body,
)
from spirit_gpu.protocol.agent import FEATURES_HEADER, has_feature
from spirit_gpu.protocol.proxy import (
    CLIENT_AUTH_HEADER,
    DEREGISTER_PATH,
    FEATURE,
    LINK_PATH,
    REGISTER_PATH,
    REQUEST_ID_HEADER,
    WORKER_TOKEN_HEADER,
    WORKERS_PATH,
    LinkData,
    LinkEnd,
    LinkFail,
    LinkHead,
    ProxyDeregistration,
    ProxyRegistration,
    ProxyWorkers,
    RegisterReply,
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


class ProxyRouter:
    """The gateway end of the proxy path (one per application)."""

    def __init__(self, config: GatewayConfig, metrics: ProxyMetrics | None = None) -> None:
        self.config = config
        self.registry = ProxyRegistry(lease_seconds=config.lease_seconds)
        self.metrics = metrics or ProxyMetrics()
        self.session: aiohttp.ClientSession | None = None

    async def shutdown(self, app: web.Application) -> None:
        """Close the proxy links, so that the server's shutdown does not wait on them."""
        for link in self.registry.links():
            await link.ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"gateway stopping")

    async def lifetime(self, app: web.Application) -> AsyncIterator[None]:
        self.session = new_session()
        yield
        await self.session.close()

    # ---- client side -------------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        auth = request.headers.get(CLIENT_AUTH_HEADER)
        if auth is None or not request.path.startswith(_PREFIXES):
            return await handler(request)
        sid, sep, key = auth.strip().partition("-")
        if not sep or not sid or not key:
            return json_error(401, "invalid Auth header: expected 'Auth: <serverless id>-<api "
                                   "key>'")
        if not any(hmac.compare_digest(key, k) for k in self.config.api_keys):
            return json_error(401, "invalid api key")
        length = request.content_length
        if length is not None and length > self.config.max_body_bytes:
            return json_error(400, "request body too large")
        metrics = self.metrics
        metrics.begin(sid)
        code = "500"
        try:
            response, cut = await self.forward(request, sid)
            code = _CUT_CODES.get(cut, "") or str(response.status)
            return response
        finally:
            metrics.end(sid, code)

    async def forward(self, request: web.Request, sid: str) -> tuple[web.StreamResponse, str]:
        """The response, and why its stream was cut ("" when it was not)."""
        assert self.session is not None, "proxy route used before the app started"
        rid = request.headers.get(REQUEST_ID_HEADER) or f"{_id_prefix}-{next(_ids)}"
        headers = filter_pairs(request.headers.items(), _DROP)
        headers.append((REQUEST_ID_HEADER, rid))
        if self.config.worker_token:
            headers.append((WORKER_TOKEN_HEADER, self.config.worker_token))
        body = await request_body(request)
        replayable = body is None or isinstance(body, bytes)
        loop = asyncio.get_running_loop()
        head_deadline = loop.time() + self.config.proxy_response_timeout
        tried: set[ProxyWorker] = set()
        retried_same = False
        while True:
            worker = self.registry.pick(sid, tried)
            if worker is None and not tried:  # no registered worker: try the queue
                queued_answer = await queued.forward(request, request.app[GATEWAY_KEY], sid,
                                                     rid, body)
                if queued_answer is not None:
                    return queued_answer, ""
            if worker is None:
                return json_error(503, "not enough gpu now", {REQUEST_ID_HEADER: rid}), ""
            worker.inflight += 1
            try:
                link = worker.link
                if link is not None and not link.closed:
                    outcome = await self._via_link(request, sid, worker, link, rid, headers,
                                                   body, head_deadline)
                    if outcome is None:  # the link died before an answer began
                        tried.add(worker)
                        continue
                    return outcome
                url = URL(worker.url + request.raw_path, encoded=True)
                try:
                    async with asyncio.timeout_at(head_deadline):
                        upstream = await self.session.request(
                            request.method, url, headers=headers, data=body,
                            allow_redirects=False)
                except TimeoutError:
                    logger.warn(f"proxy {request.method} {request.path}: no response from "
                                f"worker {worker.worker_id} within "
                                f"{self.config.proxy_response_timeout:g}s", request_id=rid)
                    return json_error(408, "request timeout: the worker did not start "
                                           "responding in time", {REQUEST_ID_HEADER: rid}), ""
                except _RETRY_SAME as exc:
                    if replayable and not retried_same:
                        retried_same = True  # perhaps a stale keep-alive connection
                        continue
                    self.registry.drop(worker, repr(exc))
                    if not replayable:
                        return json_error(502, f"worker failed: {exc!r}"), ""
                    tried.add(worker)
                    continue
                except (aiohttp.ClientError, OSError) as exc:
                    self.registry.drop(worker, repr(exc))
                    if not replayable:
                        return json_error(502, f"worker unreachable: {exc!r}"), ""
                    tried.add(worker)
                    continue
                self.metrics.response_started(
                    sid, loop.time() - head_deadline + self.config.proxy_response_timeout)
                try:
                    result = await relay(
                        request, ClientAnswer(upstream), {REQUEST_ID_HEADER: rid},
                        deadline=loop.time() + self.config.proxy_transfer_timeout)
                finally:
                    if upstream.content.is_eof():
                        upstream.release()
                    else:
                        upstream.close()
                if result.cut == "upstream":
                    self.registry.drop(worker, f"stream broke: {result.detail}")
                if result.cut:
                    logger.warn(f"proxy {request.method} {request.path} via "
                                f"{worker.worker_id} cut ({result.cut}): {result.detail}",
                                request_id=rid)
                return result.response, result.cut
            finally:
                worker.inflight -= 1

    async def _via_link(self, request: web.Request, sid: str, worker: ProxyWorker,
                        link: GatewayLink, rid: str, headers: list[tuple[str, str]], body: Any,
                        head_deadline: float) -> tuple[web.StreamResponse, str] | None:
        """One exchange over ``worker``'s proxy link; None: try another worker."""
        streamed = body is not None and not isinstance(body, bytes)
        stream = link.open(request.method, request.raw_path, headers,
                           b"" if streamed or body is None else body, streamed, rid)
        pump = asyncio.create_task(_pump_body(link, stream, body)) if streamed else None
        try:
            return await self._answer(request, sid, worker, stream, rid, streamed,
                                      head_deadline)
        finally:
            if pump is not None:
                pump.cancel()
            link.finish(stream)

    async def _answer(self, request: web.Request, sid: str, worker: ProxyWorker,
                      stream: LinkStream, rid: str, streamed: bool,
                      head_deadline: float) -> tuple[web.StreamResponse, str] | None:
        """The worker's answer on ``stream``, on to the client (see ``_via_link``)."""
        loop = asyncio.get_running_loop()
        resp: web.StreamResponse | None = None
        cut, detail = "", ""
        try:
            # one timer for both limits: the head's, then (rescheduled) the transfer's
            async with asyncio.timeout_at(head_deadline) as limit:
                head = await stream.get()
                if isinstance(head, LinkFail):
                    if stream.lost:
                        self.registry.drop(worker, head.message)
                        if streamed:
                            return json_error(502, f"worker failed: {head.message}"), ""
                        return None
                    return json_error(502, head.message, {REQUEST_ID_HEADER: rid}), ""
                assert isinstance(head, LinkHead), head
                self.metrics.response_started(
                    sid, loop.time() - head_deadline + self.config.proxy_response_timeout)
                out = CIMultiDict(head.headers)
                out[REQUEST_ID_HEADER] = rid
                if (stream.ended and request.method != "HEAD"
                        and isinstance(stream.frames[-1], LinkEnd)):
                    # the whole answer came in one batch: one write, with its length
                    # (an ended stream's last frame says how it ended)
                    parts = [f.data for f in stream.frames if isinstance(f, LinkData)]
                    stream.frames.clear()
                    out.popall("Content-Length", None)
                    return web.Response(status=head.status, reason=head.reason or None,
                                        body=b"".join(parts), headers=out), ""
                resp = LazyHeadResponse(status=head.status, reason=head.reason or None,
                                        headers=out)
                try:
                    await resp.prepare(request)
                    if not stream.frames:  # no data yet: the head goes out alone, now
                        await resp.write(b"")
                except ConnectionError:
                    return resp, "client"
                limit.reschedule(loop.time() + self.config.proxy_transfer_timeout)
                cut, detail = await self._write_body(resp, stream, worker)
        except TimeoutError:
            if resp is None:
                logger.warn(f"proxy {request.method} {request.path}: no response from worker "
                            f"{worker.worker_id} within "
                            f"{self.config.proxy_response_timeout:g}s", request_id=rid)
                return json_error(408, "request timeout: the worker did not start responding "
                                       "in time", {REQUEST_ID_HEADER: rid}), ""
            cut, detail = "deadline", "transfer limit reached"
        if cut in ("upstream", "deadline"):
            cut_connection(request)
        if cut:
            logger.warn(f"proxy {request.method} {request.path} via {worker.worker_id} "
                        f"cut ({cut}): {detail}", request_id=rid)
        return resp, cut

    async def _write_body(self, resp: web.StreamResponse, stream: LinkStream,
                          worker: ProxyWorker) -> tuple[str, str]:
        """The worker's data frames, on to the client; why it was cut ("" if it was not)."""
        while True:
            frame = await stream.get()
            if isinstance(frame, LinkData):
                data, end = stream.take_data(frame.data)
                try:
                    if end:  # last data and the terminator in one write
                        await resp.write_eof(data)
                        return "", ""
                    await resp.write(data)
                except ConnectionError as exc:
                    return "client", repr(exc)
            elif isinstance(frame, LinkEnd):
                return "", ""
            else:
                detail = getattr(frame, "message", repr(frame))
                if stream.lost:
                    self.registry.drop(worker, detail)
                return "upstream", detail

    # ---- agent side (registration extension) -------------------------------------

    async def link(self, request: web.Request) -> web.StreamResponse:
        """The proxy link: the worker dials in, exchanges are multiplexed over it."""
        denied = self._worker_denied(request)
        if denied is not None:
            return denied
        sid = request.match_info["sid"]
        worker_id = request.query.get("workerID", "")
        worker = self.registry.get(sid, worker_id)
        if worker is None:
            return json_error(404, f"unknown proxy worker {worker_id!r}: register first",
                              {FEATURES_HEADER: FEATURE})
        ws = web.WebSocketResponse(max_msg_size=0, heartbeat=30.0)
        await ws.prepare(request)
        link = GatewayLink(ws)
        worker.link = link
        logger.info(f"proxy worker {worker_id} of {sid}: link up")
        try:
            await link.read_loop()
        finally:
            if worker.link is link:
                worker.link = None
            if self.registry.get(sid, worker_id) is worker:
                self.registry.drop(worker, "its proxy link closed")
        return ws

    def _worker_denied(self, request: web.Request) -> web.Response | None:
        token = self.config.worker_token
        if not token:
            return None
        if hmac.compare_digest(bearer(request).encode(), token.encode()):
            return None
        return json_error(401, "invalid worker token", {FEATURES_HEADER: FEATURE})

    async def register(self, request: web.Request) -> web.Response:
        denied = self._worker_denied(request)
        if denied is not None:
            return denied
        try:
            reg = msgspec.json.decode(await request.read(), type=ProxyRegistration)
        except msgspec.ValidationError as exc:
            return json_error(400, f"invalid registration: {exc}", {FEATURES_HEADER: FEATURE})
        except msgspec.DecodeError as exc:
            return json_error(400, f"invalid registration JSON: {exc}",
                              {FEATURES_HEADER: FEATURE})
        if not reg.url.startswith(("http://", "https://")) or not reg.workerID:
            return json_error(400, "invalid registration: url must be http(s)://host:port "
                                   "and workerID non-empty", {FEATURES_HEADER: FEATURE})
        self.registry.register(request.match_info["sid"], reg)
        reply = RegisterReply(workerID=reg.workerID, leaseSeconds=self.config.lease_seconds,
                              link=LINK_PATH)
        return web.Response(body=msgspec.json.encode(reply), content_type="application/json",
                            headers={FEATURES_HEADER: FEATURE})

    async def deregister(self, request: web.Request) -> web.Response:
        denied = self._worker_denied(request)
        if denied is not None:
            return denied
        try:
            dereg = msgspec.json.decode(await request.read(), type=ProxyDeregistration)
        except msgspec.MsgspecError as exc:
            return json_error(400, f"invalid deregistration: {exc}", {FEATURES_HEADER: FEATURE})
        self.registry.deregister(request.match_info["sid"], dereg.workerID)
        return web.json_response({}, headers={FEATURES_HEADER: FEATURE})

    async def workers(self, request: web.Request) -> web.Response:
        denied = self._worker_denied(request)
        if denied is not None:
            return denied
        listing = ProxyWorkers(workers=self.registry.workers(request.match_info["sid"]))
        return web.Response(body=msgspec.json.encode(listing), content_type="application/json",
                            headers={FEATURES_HEADER: FEATURE})


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


async def _not_proxied(request: web.Request) -> web.StreamResponse:
    """The catch-all routes' answer to a request without ``Auth``: what the router would say.

    The catch-alls exist for speed (a miss in aiohttp's router costs an
    ``HTTPNotFound`` per request, ~50 µs, before the middleware sees it); this
    keeps 404 and 405 exactly as they were for everything else.
    """
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if getattr(resource, "spirit_catch_all", False):
            continue
        match, methods = await resource.resolve(request)
        if match is not None:  # cannot happen (it would have matched first); be safe
            return await match.handler(request)
        allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


ROUTER_KEY: web.AppKey[ProxyRouter] = web.AppKey("spirit_proxy_router", ProxyRouter)


def install(app: web.Application, config: GatewayConfig) -> None:
    """Mount the proxy route, the registration extension and the feature announcement."""
    gateway = app.get(GATEWAY_KEY)
    router = ProxyRouter(config, ProxyMetrics(gateway.metrics.registry if gateway else None))
    app[ROUTER_KEY] = router
    app.middlewares.insert(0, router.middleware)
    app.cleanup_ctx.append(router.lifetime)
    app.on_shutdown.append(router.shutdown)
    app.on_response_prepare.append(_announce)
    base = "/agent/{sid}"
    app.router.add_post(base + REGISTER_PATH, router.register)
    app.router.add_post(base + DEREGISTER_PATH, router.deregister)
    app.router.add_get(base + WORKERS_PATH, router.workers)
    app.router.add_get(base + LINK_PATH, router.link)
    for prefix in _PREFIXES:  # last, so every route of the public API matches first
        route = app.router.add_route("*", prefix + "{tail:.*}", _not_proxied)
        route.resource.spirit_catch_all = True  # type: ignore[union-attr]
