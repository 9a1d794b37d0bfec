"""Gateway test set-up: real gateways on 127.0.0.1, a webhook receiver, a scripted
plain-protocol worker, and real supervisor processes (tests/conftest.py's Worker)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from spirit_gpu.gateway.app import create_app
from spirit_gpu.gateway.config import GatewayConfig
from tests.conftest import free_port, until

KEY = "test-key"
TOKEN = "worker-token"
AUTH = {"Authorization": f"Bearer {KEY}"}
APPS = Path(__file__).parent / "apps"


@dataclass
class Gw:
    url: str
    config: GatewayConfig
    app: web.Application
    session: aiohttp.ClientSession

    def agent(self, sid: str) -> str:
        return f"{self.url}/agent/{sid}/apis/v1"

    async def call(self, method: str, path: str, *, json_body: Any = None, data: Any = None,
                   headers: dict[str, str] | None = None,
                   params: dict[str, str] | None = None) -> tuple[int, Any, aiohttp.ClientResponse]:
        hdrs = dict(AUTH) if headers is None else headers
        async with self.session.request(method, self.url + path, json=json_body, data=data,
                                        headers=hdrs, params=params) as resp:
            raw = await resp.read()
            body: Any = raw
            if raw and resp.content_type == "application/json":
                body = json.loads(raw)
            return resp.status, body, resp

    async def status(self, sid: str, request_id: str) -> dict[str, Any]:
        code, body, _ = await self.call("GET", f"/v1/{sid}/status",
                                        params={"requestID": request_id})
        assert code == 200, body
        return dict(body)


GatewayFactory = Callable[..., Awaitable[Gw]]


BOTH_STORES = pytest.mark.parametrize("store", ["memory", "nats"], indirect=True)


@pytest.fixture
async def gateway_factory(store: str) -> AsyncIterator[GatewayFactory]:
    runners: list[web.AppRunner] = []
    session = aiohttp.ClientSession()

    async def make(**overrides: Any) -> Gw:
        values: dict[str, Any] = {"api_keys": [KEY], "sweep_interval": 0.05, "store": store}
        values.update(overrides)
        config = GatewayConfig(**values)
        app = create_app(config)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        port = int(overrides.get("port") or 0) or free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        return Gw(f"http://127.0.0.1:{port}", config, app, session)

    yield make
    await session.close()
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def gw(gateway_factory: GatewayFactory) -> Gw:
    return await gateway_factory()


@dataclass
class Webhooks:
    url: str = ""
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    async def wait(self, n: int = 1, within: float = 15.0) -> list[tuple[dict[str, str], bytes]]:
        async def enough() -> bool:
            return len(self.received) >= n
        await until(enough, within, f"{n} webhook(s)")
        return self.received


@pytest.fixture
async def webhooks() -> AsyncIterator[Webhooks]:
    hooks = Webhooks()

    async def receive(request: web.Request) -> web.Response:
        hooks.received.append((dict(request.query), await request.read()))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    hooks.url = f"http://127.0.0.1:{port}/hook"
    yield hooks
    await runner.cleanup()


class PlainWorker:
    """Drives the agent API by hand, as a worker would (plain protocol)."""

    def __init__(self, gw: Gw, sid: str, token: str = "", worker_id: str = "") -> None:
        self.gw = gw
        self.base = gw.agent(sid)
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        if worker_id:
            self.headers["Spirit-Worker-Id"] = worker_id

    async def pull(self, wait_ms: int = 0) -> tuple[int, dict[str, Any] | None]:
        params = {"wait": str(wait_ms)} if wait_ms else None
        async with self.gw.session.get(f"{self.base}/request", params=params,
                                       headers=self.headers) as resp:
            if resp.status != 200:
                return resp.status, None
            env = await resp.json()
            env["input"] = json.loads(base64.b64decode(env["body"]))
            return 200, env

    async def post(self, path: str, body: Any = None, data: bytes | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
        hdrs = dict(self.headers, **(headers or {}))
        async with self.gw.session.post(f"{self.base}/{path}", json=body, data=data,
                                        headers=hdrs) as resp:
            raw = await resp.read()
            return resp.status, json.loads(raw) if raw else None

    async def result(self, request_id: str, code: int, data: bytes,
                     message: str = "") -> tuple[int, Any]:
        return await self.post(f"request-result/{request_id}",
                               {"statusCode": code, "message": message,
                                "data": base64.b64encode(data).decode()})

    async def executing(self, request_id: str) -> None:
        code, _ = await self.post(f"request-metric/{request_id}", {"status": "executing"})
        assert code == 200

    async def heartbeat(self, ids: list[str]) -> list[str]:
        code, body = await self.post("heartbeat", {"requestIDs": ids})
        assert code == 200, body
        return list(body["cancel"])

    async def serve_echo(self) -> None:
        """Answer every job with {"echo": input} until cancelled."""
        while True:
            code, env = await self.pull(wait_ms=2000)
            if env is None:
                continue
            rid = env["headers"]["Ease-Request-Id"]
            await self.executing(rid)
            await self.result(rid, 200, json.dumps({"echo": env["input"].get("input")}).encode())
            await self.post(f"request-ack/{rid}")


@pytest.fixture
async def echo_worker(gw: Gw) -> AsyncIterator[PlainWorker]:
    """A scripted worker answering sid 'echo' on the default gateway."""
    w = PlainWorker(gw, "echo")
    task = asyncio.create_task(w.serve_echo())
    yield w
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


from tests.gateway.serving import served  # noqa: E402,F401 - a fixture: the gateway as served
