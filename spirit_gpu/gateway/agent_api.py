"""The reference agent API under /agent/<sid>/apis/v1/ (DESIGN.md section 5),
with our optional extensions: long-poll, stream chunks, cancel in heartbeats."""

from __future__ import annotations

import base64
import binascii
from typing import TypeVar

import msgspec
from aiohttp import web

from spirit_gpu.gateway.auth import require_worker
from spirit_gpu.gateway.httpio import ApiError, json_response, read_body, serverless_id
from spirit_gpu.gateway.service import FEATURES, GATEWAY_KEY, Gateway, envelope, worker_identity
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
    return web.Response(body=envelope(rec), content_type="application/json")


async def post_metric(request: web.Request) -> web.StreamResponse:
    gw, sid, _ = await _worker(request)
    body = _decode(_metric, await read_body(request, SMALL_BODY))
    if body.status == "executing":
        await gw.report_started(sid, request.match_info["request_id"])
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
    app.on_response_prepare.append(add_features)
