"""A stand-in of the hosted platform's agent: DESIGN.md sections 5 and 5a, no extensions.

A real aiohttp server. Jobs are queued with ``add``; everything a worker
posts is recorded. ``request-proxy`` bodies are recorded chunk by chunk as
they arrive (``proxy[id].chunks``), so a test can see an answer streaming.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.conftest import free_port


@dataclass
class ProxyAnswer:
    status: int
    headers: dict[str, str]
    chunks: list[bytes] = field(default_factory=list)
    complete: bool = False

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


@dataclass
class HostedAgent:
    url: str = ""
    queue: deque[bytes] = field(default_factory=deque)
    metrics: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    acks: list[str] = field(default_factory=list)
    heartbeats: list[list[str]] = field(default_factory=list)
    proxy: dict[str, ProxyAnswer] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)

    def add(self, body: bytes, enqueue_at: int | None = None, ttl_ms: int = 600_000) -> str:
        import time
        rid = str(uuid.uuid4())
        at = int(time.time() * 1000) if enqueue_at is None else enqueue_at
        headers = {"Ease-Mode": "sync", "Ease-Request-Id": rid, "Ease-Enqueue-At": str(at),
                   "Ease-Create-At": str(at), "Ease-Time-To-Live": str(ttl_ms),
                   "Ease-Webhook": ""}
        self.queue.append(json.dumps({"headers": headers,
                                      "body": base64.b64encode(body).decode()}).encode())
        return rid

    def add_proxy(self, method: str, uri: str, header: dict[str, list[str]] | None = None,
                  body: bytes = b"", **kw: Any) -> str:
        job: dict[str, Any] = {"method": method, "uri": uri, "header": header or {}}
        if body:
            job["body"] = base64.b64encode(body).decode()
        return self.add(json.dumps(job).encode(), **kw)

    def statuses(self, rid: str) -> list[str]:
        return [m["status"] for m in self.metrics.get(rid, [])]

    def app(self) -> web.Application:
        app = web.Application()
        r = app.router
        r.add_get("/apis/v1/request", self.get_request)
        r.add_post("/apis/v1/request-metric/{id}", self.metric)
        r.add_post("/apis/v1/request-result/{id}", self.result)
        r.add_post("/apis/v1/request-ack/{id}", self.ack)
        r.add_post("/apis/v1/request-proxy/{id}", self.proxy_answer)
        r.add_post("/apis/v1/heartbeat", self.heartbeat)
        app.middlewares.append(self._record)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.calls.append(f"{request.method} {request.path}")
        return await handler(request)  # type: ignore[no-any-return]

    async def get_request(self, request: web.Request) -> web.Response:
        if not self.queue:
            return web.Response(status=404)
        return web.Response(body=self.queue.popleft(), content_type="application/json")

    async def metric(self, request: web.Request) -> web.Response:
        self.metrics.setdefault(request.match_info["id"], []).append(await request.json())
        return web.json_response({})

    async def result(self, request: web.Request) -> web.Response:
        self.results[request.match_info["id"]] = await request.json()
        return web.json_response({})

    async def ack(self, request: web.Request) -> web.Response:
        self.acks.append(request.match_info["id"])
        return web.json_response({})

    async def heartbeat(self, request: web.Request) -> web.Response:
        self.heartbeats.append(list((await request.json()).get("requestIDs") or []))
        return web.Response()

    async def proxy_answer(self, request: web.Request) -> web.Response:
        answer = ProxyAnswer(int(request.query["statusCode"]), dict(request.headers))
        self.proxy[request.match_info["id"]] = answer
        async for chunk in request.content.iter_any():
            answer.chunks.append(chunk)
        answer.complete = True
        return web.Response()


async def start_hosted_agent() -> AsyncIterator[HostedAgent]:
    agent = HostedAgent()
    runner = web.AppRunner(agent.app(), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    agent.url = f"http://127.0.0.1:{port}"
    try:
        yield agent
    finally:
        await asyncio.wait_for(runner.cleanup(), 10)
