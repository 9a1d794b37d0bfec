"""GET /v1/<sid>/stream?requestID=: a request's stream chunks as Server-Sent Events."""

from __future__ import annotations

import msgspec
from aiohttp import web

from spirit_gpu.gateway.auth import require_api_key
from spirit_gpu.gateway.httpio import ApiError, serverless_id
from spirit_gpu.gateway.service import GATEWAY_KEY
from spirit_gpu.gateway.storage.base import ChunkEvent

_json = msgspec.json.Encoder()


def sse_event(data: bytes, event: str = "", event_id: str = "") -> bytes:
    """One SSE event; a payload with newlines becomes several ``data:`` lines."""
    out = bytearray()
    if event:
        out += b"event: " + event.encode() + b"\n"
    if event_id:
        out += b"id: " + event_id.encode() + b"\n"
    for line in data.splitlines() or [b""]:
        out += b"data: " + line + b"\n"
    out += b"\n"
    return bytes(out)


async def stream(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    require_api_key(request, gw.config)
    sid = serverless_id(request)
    request_id = request.query.get("requestID", "")
    if not request_id:
        raise ApiError(400, "invalid request arguments: requestID is required")
    if await gw.storage.get(sid, request_id) is None:
        raise ApiError(404, "request not found (unknown or past retention)")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    try:
        async for ev in gw.storage.stream(sid, request_id):
            if isinstance(ev, ChunkEvent):
                await resp.write(sse_event(ev.data, event_id=str(ev.seq)))
            else:
                payload = {"statusCode": ev.status_code, "status": ev.status}
                await resp.write(sse_event(_json.encode(payload), event="end"))
        await resp.write_eof()
    except (ConnectionError, OSError):
        pass  # the client went away
    return resp


def install(app: web.Application) -> None:
    app.router.add_get("/v1/{sid}/stream", stream)
