"""Who may call: clients by API key, workers by the worker token."""

from __future__ import annotations

import hmac

from aiohttp import web

from spirit_gpu.gateway.config import GatewayConfig
from spirit_gpu.gateway.httpio import ApiError


def bearer(request: web.Request) -> str:
    value = request.headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _matches(token: str, allowed: list[str]) -> bool:
    found = False
    for key in allowed:  # no early exit: timing does not tell which key matched
        # (a header's bytes that are not UTF-8 arrive as surrogates: no match, no error)
        found |= hmac.compare_digest(token.encode("utf-8", "surrogateescape"),
                                     key.encode("utf-8", "surrogateescape"))
    return found


def require_api_key(request: web.Request, config: GatewayConfig) -> None:
    token = bearer(request)
    if not token or not _matches(token, config.api_keys):
        raise ApiError(401, "unauthorized: send 'Authorization: Bearer <api-key>' "
                       "with a key given to the gateway (--api-key)")


def require_worker(request: web.Request, config: GatewayConfig) -> None:
    if not config.worker_token:
        return
    token = bearer(request)
    if not token or not _matches(token, [config.worker_token]):
        raise ApiError(401, "unauthorized: missing or wrong worker token; workers send "
                       "'Authorization: Bearer <token>' from SPIRIT_WORKER_TOKEN")
