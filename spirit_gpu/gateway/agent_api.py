"""The reference agent API under /agent/<sid>/apis/v1/ (DESIGN.md sections 5, 5a),
with our optional extensions: long-poll, stream chunks, cancel in heartbeats.

Also here: the webhook relay workers are pointed at (webhooks.py), the answer
endpoint of queue-delivered proxy jobs (``request-proxy``, proxy/queued.py),
and a clear refusal of ``/apis/v1/*`` at the gateway's root, which is where
the original worker ends up when given ``EASE_AGENT_URL=<gateway>/agent/<sid>``.
"""

from __future__ import annotations

import base64
import binascii
import time
from typing import TypeVar

import msgspec
from aiohttp import web

from spirit_gpu.gateway.auth import require_worker
from spirit_gpu.gateway.httpio import ApiError, json_response, read_body, serverless_id
from spirit_gpu.gateway.proxy import queued
from spirit_gpu.gateway.service import FEATURES, GATEWAY_KEY, Gateway, envelope, worker_identity
from spirit_gpu.gateway.storage.base import StorageUnavailable
from spirit_gpu.gateway.webhooks import RELAY_PATH
from spirit_gpu.log import logger
from spirit_gpu.protocol import agent
from spirit_gpu.protocol.agent import FEATURES_HEADER, Heartbeat, ResultBody, StatusMetric

PREFIX = "/agent/{sid}" + agent.API_PREFIX
SMALL_BODY = 1024 * 1024


T = TypeVar("T")

_metric = msgspec.json.Decoder(StatusMetric)
_result = msgspec.json.Decoder(ResultBody)
_heartbeat = msgspec.json.Decoder(Heartbeat)


async def _worker(request: web.Request) -> tuple[Gateway, str, str]:
    """Authenticate; note the sign of life. Returns (gateway, sid, worker)."""
    gw = request.app[GATEWAY_KEY]
    require_worker(request, gw.config)
    sid = serverless_id(request)
    worker = worker_identity(request)
    await gw.storage.touch_worker(sid, worker)
    return gw, sid, worker


def _decode(decoder: msgspec.json.Decoder[T], raw: bytes) -> T:
    try:
        return decoder.decode(raw)
    except msgspec.DecodeError as exc:  # ValidationError included
        raise ApiError(400, f"invalid request data: {exc}") from exc


async def get_request(request: web.Request) -> web.StreamResponse:
    gw, sid, worker = await _worker(request)
    try:
        wait_ms = int(request.query.get("wait", "0") or 0)
    except ValueError as exc:
        raise ApiError(400, "invalid request arguments: wait must be milliseconds") from exc
    rec = await gw.storage.take(sid, worker, gw.long_poll_seconds(wait_ms))
    if rec is None:
        return json_response({"error": "no request"}, 404)
    if request.transport is None or request.transport.is_closing():
        await gw.storage.give_back(sid, rec.request_id)  # the worker left while waiting
        return json_response({"error": "gone"}, 404)
    base = request.headers.get(agent.AGENT_BASE_HEADER, "")
    if not base.startswith(("http://", "https://")):
        base = f"{request.url.origin()}/agent/{sid}{agent.API_PREFIX}"
    return web.Response(body=envelope(rec, base), content_type="application/json")


async def post_metric(request: web.Request) -> web.StreamResponse:
    gw, sid, _ = await _worker(request)
    body = _decode(_metric, await read_body(request, SMALL_BODY))
    if body.status == "executing":
        await gw.report_started(sid, request.match_info["request_id"])
    elif body.status in ("succeed", "failed"):
        await gw.report_final(sid, request.match_info["request_id"], body.status, body.message)
    return json_response({})


async def post_result(request: web.Request) -> web.StreamResponse:
    gw, sid, _ = await _worker(request)
    limit = gw.config.max_result_bytes_sync * 4 // 3 + SMALL_BODY
    body = _decode(_result, await read_body(request, limit))
    try:
        data = base64.b64decode(body.data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, f"invalid request data: data is not base64: {exc}") from exc
    refused = await gw.report_result(sid, request.match_info["request_id"], body.statusCode,
                                     body.message, data)
    if refused == "request not found":
        raise ApiError(404, refused)
    if refused:
        raise ApiError(413, refused)
    return json_response({})


async def post_ack(request: web.Request) -> web.StreamResponse:
    gw, sid, _ = await _worker(request)
    await read_body(request, SMALL_BODY)
    await gw.storage.ack(sid, request.match_info["request_id"])
    return json_response({})


async def post_chunk(request: web.Request) -> web.StreamResponse:
    gw, sid, _ = await _worker(request)
    try:
        seq = int(request.headers.get(agent.CHUNK_SEQ_HEADER, ""))
    except ValueError as exc:
        raise ApiError(400, "invalid request arguments: Spirit-Chunk-Seq header must be an "
                       "integer") from exc
    data = await read_body(request, gw.config.max_result_bytes_sync)
    request_id = request.match_info["request_id"]
    if await gw.storage.get(sid, request_id) is None:
        raise ApiError(404, "request not found")
    await gw.storage.add_chunk(sid, request_id, seq, data)
    return json_response({})


async def post_heartbeat(request: web.Request) -> web.StreamResponse:
    gw, sid, worker = await _worker(request)
    raw = await read_body(request, SMALL_BODY)
    ids = (_decode(_heartbeat, raw).requestIDs or []) if raw.strip() else []
    cancel = await gw.storage.heartbeat(sid, worker, ids)
    return json_response({"cancel": cancel})


async def post_webhook(request: web.Request) -> web.StreamResponse:
    """A worker's webhook call for an async request (no worker token: the original
    worker sends none to webhooks; the unguessable request id is the key)."""
    gw = request.app[GATEWAY_KEY]
    sid = serverless_id(request)
    try:
        code = int(request.query.get("statusCode", ""))
    except ValueError as exc:
        raise ApiError(400, "invalid request arguments: statusCode must be an integer") from exc
    data = await read_body(request, gw.config.max_result_bytes_sync)
    try:
        status, why = await gw.relay_webhook(sid, request.match_info["request_id"], code, data)
    except StorageUnavailable as exc:
        # the worker takes any other answer but 200 as the client's webhook's own and
        # final; the store failing over is neither
        raise ApiError(503, f"the gateway's store did not answer ({exc}); try again") from exc
    if status != 200:
        raise ApiError(502 if status == 0 else status, why or "webhook refused")
    return json_response({"note": why} if why else {})


async def post_proxy_answer(request: web.Request) -> web.StreamResponse:
    gw, sid, _ = await _worker(request)
    return await queued.take_answer(request, gw, sid, request.match_info["request_id"])


_root_warned: dict[str, float] = {}
ROOT_WARN_EVERY = 60.0


async def root_agent_call(request: web.Request) -> web.StreamResponse:
    """``/apis/v1/*`` at the root: a worker given a path prefix that it dropped."""
    hint = ("the agent API of this gateway is at /agent/<serverless id>/apis/v1/; a worker "
            "that drops the path of EASE_AGENT_URL (the original spirit-gpu worker does) "
            "needs the agent sidecar: run `spirit-gpu agent --gateway <this gateway> "
            "--serverless-id <sid>` beside it and leave EASE_AGENT_URL at its default "
            "(http://localhost:8087)")
    remote = request.remote or "?"
    now = time.monotonic()
    if now - _root_warned.get(remote, -ROOT_WARN_EVERY) >= ROOT_WARN_EVERY:
        _root_warned[remote] = now
        logger.warn(f"a worker at {remote} called {request.method} {request.path}: {hint}")
    # not 404: the original worker reads 404 as "queue empty" and logs nothing
    raise ApiError(400, hint)


async def add_features(request: web.Request, response: web.StreamResponse) -> None:
    """Every agent-API answer announces our extensions (the worker switches them on)."""
    if request.path.startswith("/agent/"):
        response.headers[FEATURES_HEADER] = ",".join(FEATURES)


def install(app: web.Application) -> None:
    r = app.router
    r.add_get(f"{PREFIX}/{agent.REQUEST}", get_request)
    r.add_post(f"{PREFIX}/{agent.METRIC}/{{request_id}}", post_metric)
    r.add_post(f"{PREFIX}/{agent.RESULT}/{{request_id}}", post_result)
    r.add_post(f"{PREFIX}/{agent.ACK}/{{request_id}}", post_ack)
    r.add_post(f"{PREFIX}/{agent.CHUNK}/{{request_id}}", post_chunk)
    r.add_post(f"{PREFIX}/{agent.HEARTBEAT}", post_heartbeat)
    r.add_post(f"{PREFIX}/{agent.PROXY_ANSWER}/{{request_id}}", post_proxy_answer)
    r.add_post(f"{PREFIX}/{RELAY_PATH}/{{request_id}}", post_webhook)
    r.add_route("*", agent.API_PREFIX + "/{tail:.*}", root_agent_call)
    app.on_response_prepare.append(add_features)
