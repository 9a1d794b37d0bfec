"""Operational endpoints: /healthz, /readyz, /metrics, /openapi.json."""

from __future__ import annotations

from aiohttp import web

from spirit_gpu.gateway import metrics, openapi
from spirit_gpu.gateway.httpio import error_response, json_response
from spirit_gpu.gateway.service import GATEWAY_KEY


async def healthz(request: web.Request) -> web.StreamResponse:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    try:
        await gw.storage.stats()
    except Exception as exc:  # storage unreachable (a future NATS backend)
        return error_response(503, f"storage not ready: {exc}")
    return json_response({"status": "ready"})


async def prometheus(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    resp = web.Response(body=await gw.metrics.render(gw.storage))
    resp.headers["Content-Type"] = metrics.CONTENT_TYPE
    return resp


async def openapi_json(request: web.Request) -> web.StreamResponse:
    return json_response(openapi.document())


def install(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", prometheus)
    app.router.add_get("/openapi.json", openapi_json)
