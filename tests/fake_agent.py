"""A small real HTTP server playing the platform's agent (an external system)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class FakeAgent:
    """Serves queued requests on GET /apis/v1/request and records every call."""

    prefix: str = ""
    healthy: bool = True
    features: str | None = None
    down: bool = False
    heartbeat_down: bool = False  # answers 503 to heartbeats only
    queue: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    acks: list[str] = field(default_factory=list)
    heartbeats: list[list[str]] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    cancel: list[str] = field(default_factory=list)
    auth: list[str] = field(default_factory=list)
    worker_ids: list[str] = field(default_factory=list)
    url: str = ""
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def enqueue(self, request_id: str, body: Any, mode: str = "sync", webhook: str = "",
                enqueue_at: int | None = None, ttl_ms: int | None = None,
                raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(body).encode()
        headers = {"Ease-Mode": f"{mode},{mode}", "Ease-Request-Id": request_id,
                   "Ease-Enqueue-At": str(enqueue_at if enqueue_at is not None else now_ms()),
                   "Ease-Create-At": str(now_ms())}
        if webhook:
            headers["Ease-Webhook"] = webhook
        if ttl_ms is not None:
            headers["Ease-Time-To-Live"] = str(ttl_ms)
        self.queue.append({"headers": headers, "body": base64.b64encode(data).decode()})

    def result_body(self, request_id: str) -> bytes:
        return base64.b64decode(self.results[request_id]["data"])

    async def wait_for(self, check: Callable[[], Any], timeout: float = 15.0) -> Any:
        """``tests.conftest.until``, woken by every call the agent answers."""
        from tests.conftest import until
        return await until(check, timeout, wake=self._changed,
                           detail=lambda: f"calls: {self.calls[-20:]}")

    def _record(self, request: web.Request) -> None:
        self.calls.append(f"{request.method} {request.path}")
        self.auth.append(request.headers.get("Authorization", ""))
        self.worker_ids.append(request.headers.get("Spirit-Worker-Id", ""))
        self._changed.set()

    def _headers(self) -> dict[str, str]:
        h = {} if self.healthy else {"X-Agent-Health": "false"}
        if self.features is not None:
            h["Spirit-Agent-Features"] = self.features
        return h

    async def _get_request(self, request: web.Request) -> web.Response:
        if self.down:
            raise web.HTTPServiceUnavailable()
        if self.queue:
            self._record(request)
            return web.json_response(self.queue.pop(0), headers=self._headers())
        return web.Response(status=404, headers=self._headers())

    async def _post(self, request: web.Request) -> web.Response:
        if self.down:
            raise web.HTTPServiceUnavailable()
        kind = request.match_info["kind"]
        rid = request.match_info.get("rid", "")
        body = await request.read()
        if kind == "request-metric":
            self.metrics.setdefault(rid, []).append(json.loads(body))
        elif kind == "request-result":
            self.results[rid] = json.loads(body)
        elif kind == "request-ack":
            self.acks.append(rid)
        elif kind == "heartbeat":
            if self.heartbeat_down:
                raise web.HTTPServiceUnavailable()
            self.heartbeats.append(json.loads(body)["requestIDs"])
            reply, self.cancel = {"cancel": self.cancel}, []
            self._record(request)
            return web.json_response(reply, headers=self._headers())
        self._record(request)
        return web.Response(status=200, headers=self._headers())

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        base = f"{self.prefix}/apis/v1"
        app.router.add_get(f"{base}/request", self._get_request)
        app.router.add_post(f"{base}/{{kind}}/{{rid}}", self._post)
        app.router.add_post(f"{base}/{{kind}}", self._post)
        return app
