"""Small HTTP helpers: JSON errors, bounded body reads, id validation."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler

from spirit_gpu.gateway.conn_guard import BodyTimeout
from spirit_gpu.gateway.storage.base import StorageUnavailable

_json = msgspec.json.Encoder()
_SID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")

JSON = "application/json"


class ApiError(Exception):
    """Answered as ``{"error": message}`` with ``status`` (by ``error_middleware``)."""

    def __init__(self, status: int, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close  # drop the connection (the rest of the body is not read)


def json_response(payload: object, status: int = 200) -> web.Response:
    return web.Response(body=_json.encode(payload), status=status, content_type=JSON)


def error_response(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error the gateway answers is ``{"error": msg}`` JSON."""
    try:
        return await handler(request)
    except ApiError as exc:
        resp = error_response(exc.status, exc.message)
        if exc.close:
            resp.force_close()
        return resp
    except StorageUnavailable as exc:  # (NATS restarting: the client may retry)
        return error_response(500, f"failed to handle message: {exc}")
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == JSON:
            raise
        resp = error_response(exc.status, exc.reason)
        for name in ("Allow", "Location"):
            if name in exc.headers:
                resp.headers[name] = exc.headers[name]
        return resp


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, refused (400) as soon as more than ``limit`` bytes came in."""
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(limit)
    try:
        if length is not None:  # the declared length, in one read when it is all here
            return await request.content.readexactly(length) if length else b""
        buf = bytearray()
        async for chunk in request.content.iter_any():
            buf += chunk
            if len(buf) > limit:
                raise _too_large(limit)
    except BodyTimeout as exc:
        raise ApiError(408, str(exc), close=True) from exc
    except asyncio.IncompleteReadError as exc:
        raise ApiError(400, f"failed to get request data: the body ended after "
                            f"{len(exc.partial)} of {length} bytes", close=True) from exc
    except (aiohttp.ClientError, ConnectionError, OSError) as exc:
        raise ApiError(400, f"failed to get request data: {exc}", close=True) from exc
    return bytes(buf)


def _too_large(limit: int) -> ApiError:
    return ApiError(400, f"body too large: the limit is {limit} bytes", close=True)


def is_serverless_id(sid: str) -> bool:
    """1-128 letters, digits, '.', '_' or '-', starting with a letter or digit."""
    return _SID.fullmatch(sid) is not None


def serverless_id(request: web.Request) -> str:
    sid = request.match_info.get("sid", "")
    if not is_serverless_id(sid):
        raise ApiError(400, "invalid request arguments: a serverless id is 1-128 letters, "
                       "digits, '.', '_' or '-'")
    return sid


def looks_like_json(data: bytes) -> bool:
    try:
        msgspec.json.decode(data, type=msgspec.Raw)
    except msgspec.DecodeError:
        return False
    return True
