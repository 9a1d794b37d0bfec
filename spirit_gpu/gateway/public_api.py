"""The public serverless API: /v1/<sid>/sync | async | status (DESIGN.md section 6)."""

from __future__ import annotations

import base64
from typing import Any, TypeVar

import msgspec
from aiohttp import web
from yarl import URL

from spirit_gpu.gateway.auth import require_api_key
from spirit_gpu.gateway.conn_guard import on_client_gone
from spirit_gpu.gateway.httpio import (
    JSON,
    ApiError,
    json_response,
    read_body,
    serverless_id,
)
from spirit_gpu.gateway.service import GATEWAY_KEY, Gateway
from spirit_gpu.gateway.storage.base import (
    CANCELLED_CODE,
    CLIENT_GONE,
    CancelOutcome,
    NewRequest,
    RequestRecord,
)
from spirit_gpu.protocol.agent import result_content_type


class Policy(msgspec.Struct):
    ttl: int | None = None  # ms


class ClientBody(msgspec.Struct):
    """What the gateway reads of a client's request; ``input`` stays undecoded."""

    input: msgspec.Raw = msgspec.Raw(b"")
    webhook: str | None = None
    policy: Policy | None = None


class StatusQuery(msgspec.Struct):
    requestIDs: list[str]


_body = msgspec.json.Decoder(ClientBody)
_status_query = msgspec.json.Decoder(StatusQuery)
MAX_BATCH = 1000


def _gateway(request: web.Request) -> Gateway:
    gw = request.app[GATEWAY_KEY]
    require_api_key(request, gw.config)
    return gw


T = TypeVar("T")


def _decode(decoder: msgspec.json.Decoder[T], raw: bytes) -> T:
    """A JSON body as ``T``: wrong fields are invalid arguments, bad JSON invalid data."""
    if not raw:
        raise ApiError(400, "failed to get request data: the body is empty")
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise ApiError(400, f"invalid request arguments: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"invalid request data: {exc}") from exc


def _parse(raw: bytes) -> ClientBody:
    body = _decode(_body, raw)
    if not raw.isascii():  # (fast: almost every body is ASCII)
        # JSON is UTF-8; the decoder does not look inside the undecoded input
        try:
            raw.decode()
        except UnicodeDecodeError as exc:
            raise ApiError(400, f"invalid request data: {exc}") from exc
    if not body.input:
        raise ApiError(400, "invalid request arguments: the body needs an 'input' field")
    return body


def _ttl_ms(body: ClientBody, default_s: float, max_s: float) -> int:
    ttl = body.policy.ttl if body.policy is not None else None
    if ttl is None:
        return int(default_s * 1000)
    if ttl <= 0 or ttl > max_s * 1000:
        raise ApiError(400, f"invalid request arguments: policy.ttl must be 1..{int(max_s * 1000)}"
                       " ms")
    return ttl


async def _check_webhook(request: web.Request, gw: Gateway, url: str) -> None:
    """The webhook policy (net/webhook_policy.py), at the door: 400 with its reason."""
    try:
        parsed = URL(url)
    except ValueError as exc:
        raise ApiError(400, f"invalid request arguments: webhook: {exc}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ApiError(400, "invalid request arguments: webhook must be an http(s) URL")
    if request.transport is not None:  # the listener this request came in on is ours
        gw.webhooks.listener(request.transport.get_extra_info("sockname"))
    refused = await gw.webhooks.refusal(url)
    if refused:
        raise ApiError(400, f"invalid request arguments: {refused}")


def status_view(rec: RequestRecord) -> dict[str, Any]:
    result = rec.result
    return {"statusCode": rec.status_code, "serverlessID": rec.sid,
            "requestID": rec.request_id, "status": rec.public_status, "message": rec.message,
            "result": base64.b64encode(result).decode() if result is not None else None}


NO_GPU = "not enough gpu now"


def never_connected(sid: str) -> str:
    # "since this gateway started": what a replica knows (a restart forgets, on either
    # store), so a correct id after a restart is not called a typo outright
    return (f"no worker has connected for serverless id '{sid}' since this gateway started: "
            f"check the id (workers connect with EASE_AGENT_URL=<gateway>/agent/{sid})")


async def _no_worker_message(gw: Gateway, sid: str) -> str:
    """503's message: the reference's words, then whether the id is known at all."""
    seen = await gw.storage.ever_had_worker(sid)
    if seen is None:
        return NO_GPU
    if not seen:
        return f"{NO_GPU}: {never_connected(sid)}"
    return f"{NO_GPU}: no worker of serverless id '{sid}' is connected right now; retry later"


async def _with_hint(gw: Gateway, sid: str, view: dict[str, Any]) -> dict[str, Any]:
    """A queued request of a serverless id that never had a worker says so."""
    if view["status"] == "queueing" and not view["message"] \
            and await gw.storage.ever_had_worker(sid) is False:
        view["message"] = f"queued: {never_connected(sid)}"
    return view


def _not_found(sid: str, request_id: str) -> dict[str, Any]:
    return {"statusCode": 404, "serverlessID": sid, "requestID": request_id,
            "status": "notFound", "message": "request not found (unknown or past retention)",
            "result": None}


def result_response(rec: RequestRecord) -> web.Response:
    """A sync request's answer: the worker's status code and the handler's bytes."""
    data = rec.result
    if data:
        return web.Response(body=data, status=rec.status_code,
                            content_type=result_content_type(data))
    if 200 <= rec.status_code < 300:
        return web.Response(body=b"", status=rec.status_code, content_type=JSON)
    return json_response({"error": rec.message or rec.status}, rec.status_code)


def shutdown_message(gw: Gateway, request_id: str) -> str:
    if gw.storage.outlives_gateway:  # the NATS store: the request lives on
        return (f"gateway shutting down: request {request_id} has not ended; read its "
                "status through another gateway replica")
    return (f"gateway shutting down: request {request_id} had not ended and is lost with "
            "it (the memory store; --store nats://... keeps requests across restarts)")


async def sync_request(request: web.Request) -> web.StreamResponse:
    gw = _gateway(request)
    sid = serverless_id(request)
    cfg = gw.config
    raw = await read_body(request, cfg.max_body_bytes)
    body = _parse(raw)
    ttl = min(_ttl_ms(body, cfg.sync_timeout, cfg.async_ttl_max), int(cfg.sync_timeout * 1000))
    if body.webhook:
        await _check_webhook(request, gw, body.webhook)
    if not await gw.storage.has_worker(sid):
        raise ApiError(503, await _no_worker_message(gw, sid))
    rec = await gw.submit(NewRequest(sid=sid, mode="sync", body=raw,
                                     webhook=body.webhook or "", ttl_ms=ttl))
    # nobody is left to read the answer: end the request (its worker is told to stop)
    stop_watching = on_client_gone(request, lambda: gw.cancel_soon(
        sid, rec.request_id, CANCELLED_CODE, CLIENT_GONE))
    try:
        done = await gw.storage.wait_done(sid, rec.request_id, cfg.sync_timeout)
    finally:
        stop_watching()
    if done is None and gw.stopping:
        raise ApiError(503, shutdown_message(gw, rec.request_id))
    if done is None:
        message = f"request timeout: no result within {cfg.sync_timeout:g} s"
        await gw.cancel(sid, rec.request_id, None, 408, message)
        done = await gw.storage.get(sid, rec.request_id)
        if done is None or not done.terminal:
            raise ApiError(408, message)
    if done.status_code == 408 and done.ended_by_gateway:
        message = done.message or "request timeout"
        raise ApiError(408, message if message.startswith("request timeout")
                       else f"request timeout: {message}")
    return result_response(done)


async def async_request(request: web.Request) -> web.StreamResponse:
    gw = _gateway(request)
    sid = serverless_id(request)
    cfg = gw.config
    raw = await read_body(request, cfg.max_body_bytes)
    body = _parse(raw)
    ttl = _ttl_ms(body, cfg.async_ttl_default, cfg.async_ttl_max)
    if not body.webhook:
        raise ApiError(400, "webhook is empty for async request")
    await _check_webhook(request, gw, body.webhook)
    rec = await gw.submit(NewRequest(sid=sid, mode="async", body=raw, webhook=body.webhook,
                                     ttl_ms=ttl))
    resp = json_response({"id": rec.request_id, "sequence": rec.sequence})
    if await gw.storage.ever_had_worker(sid) is False:
        resp.headers["Spirit-Warning"] = never_connected(sid)
    return resp


async def get_status(request: web.Request) -> web.StreamResponse:
    gw = _gateway(request)
    sid = serverless_id(request)
    request_id = request.query.get("requestID")
    if request_id is None:
        return json_response({"queueingCount": await gw.storage.queue_length(sid)})
    rec = await gw.storage.get(sid, request_id)
    if rec is None:
        raise ApiError(404, "request not found (unknown or past retention)")
    return json_response(await _with_hint(gw, sid, status_view(rec)))


async def post_status(request: web.Request) -> web.StreamResponse:
    gw = _gateway(request)
    sid = serverless_id(request)
    raw = await read_body(request, gw.config.max_body_bytes)
    query = _decode(_status_query, raw)
    if len(query.requestIDs) > MAX_BATCH:
        raise ApiError(400, f"invalid request arguments: at most {MAX_BATCH} requestIDs")
    statuses = []
    for request_id in query.requestIDs:
        rec = await gw.storage.get(sid, request_id)
        statuses.append(await _with_hint(gw, sid, status_view(rec)) if rec is not None
                        else _not_found(sid, request_id))
    return json_response({"statuses": statuses})


async def delete_async(request: web.Request) -> web.StreamResponse:
    gw = _gateway(request)
    sid = serverless_id(request)
    request_id = request.query.get("requestID")
    if request_id is None:
        cleaned = await gw.storage.clean_queued(sid, "async")
        return json_response({"id": sid, "cleaned": cleaned})
    sequence: int | None = None
    if request.query.get("sequence", "") != "":
        try:
            sequence = int(request.query["sequence"])
        except ValueError as exc:
            raise ApiError(400, "invalid request arguments: sequence must be an integer") \
                from exc
    outcome = await gw.cancel(sid, request_id, sequence)
    if outcome is CancelOutcome.NOT_FOUND:
        raise ApiError(404, "request not found (unknown or past retention)")
    if outcome is CancelOutcome.SEQUENCE_MISMATCH:
        raise ApiError(400, "invalid request arguments: sequence does not match the request")
    if outcome is CancelOutcome.ALREADY_FINISHED:
        rec = await gw.storage.get(sid, request_id)
        if rec is None or rec.status != "cancelled":
            raise ApiError(400, "invalid request arguments: the request already finished")
    return json_response({"id": request_id})


def install(app: web.Application) -> None:
    app.router.add_post("/v1/{sid}/sync", sync_request)
    app.router.add_post("/v1/{sid}/async", async_request)
    app.router.add_delete("/v1/{sid}/async", delete_async)
    app.router.add_get("/v1/{sid}/status", get_status)
    app.router.add_post("/v1/{sid}/status", post_status)
