"""Proxy-route requests through the request queue, for workers that do not register.

The hosted platform has no proxy registration: a proxied HTTP request rides
the ordinary request queue as a job whose body is ``ProxyJob`` JSON
(``{"method", "uri", "header", "body"}``), and the worker streams the LLM
server's answer back as the body of ``POST request-proxy/<id>?statusCode=``
(DESIGN.md 5a). The original spirit-gpu worker in proxy mode works only that
way. When a serverless id has no registered proxy worker but has workers
polling its queue, the proxy route hands the request to ``forward`` here.

The waiting client is held in this process (``Gateway.proxy_answers``), and
the worker's ``request-proxy`` body is copied to it as it arrives; the
worker's POST is answered once the copy is done. With several gateway
replicas (NATS) the worker may post the answer to another replica than the
one holding the client: that replica hands it on through an ``AnswerRelay``
(``storage/nats/proxy_share.py``), streaming, and answers the worker once the
copy is done there. An answer nobody waits for is read and dropped.

Ends: no answer begun within ``proxy_response_timeout`` -> 408 (the request
is ended, so a late answer is dropped); the request ended before an answer
(a ``failed`` metric, worker lost, TTL) -> its status and ``{"error"}``; a
second answer for one request (the original posts a 500 after a non-200
upstream answer) is dropped: the first wins. These errors have the shape of
the route's own (``net.relay.error_body``: OpenAI's on ``/v1/*``). An answer
whose upload breaks off, or that runs past ``proxy_transfer_timeout``, cuts the
client's connection: the client sees an incomplete response.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
import msgspec
from aiohttp import web

from spirit_gpu.gateway.httpio import ApiError, json_response, read_body
from spirit_gpu.gateway.proxy.registry import REGISTRY_KEY
from spirit_gpu.gateway.service import Gateway
from spirit_gpu.gateway.storage.base import (
    CANCELLED_CODE,
    CLIENT_GONE,
    NewRequest,
    RequestRecord,
)
from spirit_gpu.log import logger
from spirit_gpu.net.aiohttp_internals import cut_connection
from spirit_gpu.net.relay import HOP_BY_HOP, filter_pairs, proxy_error
from spirit_gpu.protocol.agent import AGENT_BASE_HEADER, WORKER_ID_HEADER, ProxyJob
from spirit_gpu.protocol.proxy import CLIENT_AUTH_HEADER, REQUEST_ID_HEADER

# not passed on to the client: the worker's own request headers to the agent
_DROP_ANSWER = HOP_BY_HOP | {"authorization", "content-length", "accept", "accept-encoding",
                             "user-agent", WORKER_ID_HEADER.lower(),
                             AGENT_BASE_HEADER.lower()}  # (added by a sidecar on the way)
_DROP_REQUEST = HOP_BY_HOP | {CLIENT_AUTH_HEADER.lower(), "content-length"}
_job = msgspec.json.Encoder()


@dataclass
class ProxyAnswer:
    """A worker's ``request-proxy`` POST, handed to the client handler that waits for it."""

    status: int
    headers: list[tuple[str, str]]
    length: int | None
    body: AsyncIterator[bytes]
    # set once the copy to the client ended: "" when whole, else what cut it
    copied: asyncio.Future[str] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class AnswerRelay(Protocol):
    """How an answer posted to one replica reaches the replica whose client waits."""

    def hold(self, request_id: str, waiter: asyncio.Future[ProxyAnswer]) -> None:
        """This replica's client waits for ``request_id``: answers relayed here go to it."""

    def release(self, request_id: str) -> None:
        """The client handler ended: nothing more is taken for it."""

    async def send(self, rec: RequestRecord, answer: ProxyAnswer,
                   timeout: float) -> str | None:
        """Stream ``answer`` to the replica holding ``rec``'s client; the copy's outcome
        there ("" when whole), or None when no replica holds it (nothing of the body
        read then)."""


async def forward(request: web.Request, gw: Gateway, sid: str, rid: str, body: object,
                  relay: AnswerRelay | None = None) -> web.StreamResponse | None:
    """Queue the request as a proxy job and stream its answer; None when no worker polls."""
    if not await gw.storage.has_worker(sid):
        return None
    cfg = gw.config
    if body is None:
        raw = b""
    elif isinstance(body, bytes):
        raw = body
    else:
        raw = await read_body(request, cfg.max_body_bytes)
    header: dict[str, list[str]] = {}
    for key, value in filter_pairs(request.headers.items(), _DROP_REQUEST):
        header.setdefault(key, []).append(value)
    job = ProxyJob(method=request.method, uri=request.raw_path, header=header,
                   body=base64.b64encode(raw).decode() if raw else "")
    rec = await gw.submit(NewRequest(sid=sid, mode="sync", body=_job.encode(job), webhook="",
                                     ttl_ms=int(cfg.proxy_response_timeout * 1000)))
    request_id = rec.request_id
    answer: asyncio.Future[ProxyAnswer] = asyncio.get_running_loop().create_future()
    gw.proxy_answers[request_id] = answer
    if relay is not None:
        relay.hold(request_id, answer)
    ended = asyncio.ensure_future(gw.storage.wait_done(sid, request_id,
                                                       cfg.proxy_response_timeout))
    ids = {REQUEST_ID_HEADER: rid, "Ease-Request-Id": request_id}
    try:
        waits: set[asyncio.Future[object]] = {answer, ended}  # type: ignore[arg-type]
        await asyncio.wait(waits, timeout=cfg.proxy_response_timeout,
                           return_when=asyncio.FIRST_COMPLETED)
        if answer.done():
            return await _stream(request, gw, answer.result(), ids)
        done = ended.result() if ended.done() else None
        if done is not None:  # ended before any answer: failed metric, worker lost, TTL
            # (below 400: an answer that reached no replica holding this client ended it;
            # never a success without its body)
            code = done.status_code if done.status_code >= 400 else 502
            return proxy_error(request.path, code, done.message or done.status, ids)
        await gw.cancel(sid, request_id, None, 408, "request timeout: no proxy answer began "
                        f"within {cfg.proxy_response_timeout:g} s")
        return proxy_error(request.path, 408, "request timeout: the worker did not start "
                                              "responding in time", ids)
    except asyncio.CancelledError:  # the client left before the answer (route.py)
        if not answer.done():
            gw.cancel_soon(sid, request_id, CANCELLED_CODE, CLIENT_GONE)
        raise
    finally:
        gw.proxy_answers.pop(request_id, None)
        if relay is not None:
            relay.release(request_id)
        ended.cancel()
        if answer.done() and not answer.cancelled():
            copied = answer.result().copied
            if not copied.done():
                copied.set_result("client handler ended")


async def _stream(request: web.Request, gw: Gateway, answer: ProxyAnswer,
                  ids: dict[str, str]) -> web.StreamResponse:
    resp = web.StreamResponse(status=answer.status)
    for key, value in answer.headers:
        resp.headers.add(key, value)
    resp.headers.update(ids)
    if answer.length is not None:
        resp.content_length = answer.length
    outcome = ""
    cut = False  # the client must see an incomplete response, not a short one looking whole
    try:
        async with asyncio.timeout(gw.config.proxy_transfer_timeout):
            await resp.prepare(request)
            while True:
                try:
                    chunk = await anext(answer.body)
                except StopAsyncIteration:
                    await resp.write_eof()
                    break
                except (aiohttp.ClientError, OSError) as exc:  # the worker's upload broke
                    outcome, cut = f"transfer broke: the worker's answer: {exc!r}", True
                    break
                await resp.write(chunk)
    except TimeoutError:
        outcome, cut = "transfer cut: longer than the proxy transfer limit", True
    except (aiohttp.ClientError, ConnectionError, OSError) as exc:  # the client went away
        outcome = f"transfer broke: {exc!r}"
    if cut:
        cut_connection(request)
    if outcome:
        logger.warn(f"queued proxy answer: {outcome}", request_id=ids["Ease-Request-Id"])
    if not answer.copied.done():
        answer.copied.set_result(outcome)
    return resp


async def take_answer(request: web.Request, gw: Gateway, sid: str,
                      request_id: str) -> web.StreamResponse:
    """``POST request-proxy/<id>?statusCode=``: the body goes to the waiting client."""
    try:
        status = int(request.query.get("statusCode", ""))
    except ValueError as exc:
        raise ApiError(400, "invalid request arguments: statusCode must be an integer") from exc
    if not 100 <= status <= 999:
        raise ApiError(400, "invalid request arguments: statusCode must be 100..999")
    answer = ProxyAnswer(status=status,
                         headers=filter_pairs(request.headers.items(), _DROP_ANSWER),
                         length=request.content_length, body=request.content.iter_any())
    waiter = gw.proxy_answers.get(request_id)
    if waiter is not None and not waiter.done():
        waiter.set_result(answer)
        outcome = await answer.copied
    else:
        rec = await gw.storage.get(sid, request_id)
        relay = _relay(request)
        relayed = None
        if rec is not None and not rec.terminal and relay is not None:
            relayed = await relay.send(rec, answer, gw.config.proxy_transfer_timeout)
        if relayed is None:
            await read_body(request, gw.config.max_result_bytes_sync)
            if rec is None:
                raise ApiError(404, "request not found")
            if not rec.terminal:  # its client is gone
                await gw.storage.finish(sid, request_id, status, "proxy answer with no "
                                        "client waiting for it", None)
            return json_response({"note": "dropped: no client waits for this answer (it "
                                          "ended or took an earlier answer)"})
        outcome = relayed
    await gw.storage.finish(sid, request_id, status, outcome, None)
    return json_response({"note": outcome} if outcome else {})


def _relay(request: web.Request) -> AnswerRelay | None:
    registry = request.app.get(REGISTRY_KEY)
    return registry.answer_relay if registry is not None else None
