"""The worker side on its own: serve_proxy against a fake LLM and fake agents."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from spirit_gpu.config import WorkerConfig
from spirit_gpu.supervisor.proxy.worker import serve_proxy
from tests.conftest import until
from tests.proxy.conftest import Gateway, Worker
from tests.proxy.fake_llm import FakeLLM

MakeWorker = Callable[..., Awaitable[Worker]]


@dataclass
class PlainAgent:
    """An agent without the extension (the hosted one): 404 on register, heartbeats ok."""

    url: str = ""
    offer_proxy: bool = False
    registrations: list[dict[str, Any]] = field(default_factory=list)
    heartbeats: list[dict[str, Any]] = field(default_factory=list)
    auth: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/prefix/agent/s1/apis/v1/heartbeat", self.heartbeat)
        app.router.add_post("/prefix/agent/s1/apis/v1/proxy/register", self.register)
        app.router.add_post("/prefix/agent/s1/apis/v1/proxy/deregister", self.register)
        return app

    def _features(self) -> dict[str, str]:
        return {"Spirit-Agent-Features": "link,proxy" if self.offer_proxy else "link"}

    async def heartbeat(self, request: web.Request) -> web.Response:
        self.auth.append(request.headers.get("Authorization", ""))
        self.heartbeats.append(await request.json())
        return web.json_response({}, headers=self._features())

    async def register(self, request: web.Request) -> web.Response:
        if not self.offer_proxy:
            return web.json_response({"error": "not found"}, status=404)
        body = await request.json()
        self.registrations.append(body)
        return web.json_response({"workerID": body.get("workerID", ""), "leaseSeconds": 5.0},
                                 headers=self._features())


@pytest.fixture
async def agent() -> AsyncIterator[PlainAgent]:
    plain = PlainAgent()
    server = TestServer(plain.app(), host="127.0.0.1")
    await server.start_server()
    plain.url = str(server.make_url("/prefix/agent/s1"))
    yield plain
    await server.close()


async def test_start_deadline_ends_the_worker(llm: FakeLLM, agent: PlainAgent,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    attempts = 0

    async def never() -> tuple[bool, str]:
        nonlocal attempts
        attempts += 1
        return False, "ConnectionRefusedError: the LLM server is not up"

    cfg = WorkerConfig(agent_url=agent.url, heartbeat_interval=0.1, start_deadline=0.5)
    code = await asyncio.wait_for(serve_proxy(cfg, llm.url, never, asyncio.Event()), 10)
    assert code == 1
    assert attempts >= 3
    out = capsys.readouterr().out
    assert "check_start did not return True within 0.5s" in out
    assert out.count("the LLM server is not up") == 1  # the same error is logged once


async def test_stop_before_ready_exits_0(llm: FakeLLM, agent: PlainAgent) -> None:
    stop = asyncio.Event()

    async def not_yet() -> tuple[bool, str]:
        stop.set()
        return False, ""

    cfg = WorkerConfig(agent_url=agent.url, heartbeat_interval=0.1)
    assert await asyncio.wait_for(serve_proxy(cfg, llm.url, not_yet, stop), 10) == 0


async def test_plain_agent_gets_plain_heartbeats(llm: FakeLLM, agent: PlainAgent,
                                                 make_worker: MakeWorker) -> None:
    worker = await make_worker(llm.url, agent.url, worker_token="tok", proxy_port=0)
    await until(lambda: len(agent.heartbeats) >= 2, what="plain heartbeats")
    assert agent.heartbeats[0] == {"requestIDs": []}
    assert set(agent.auth) == {"Bearer tok"}
    assert agent.registrations == []
    # the agent learns the extension later: the worker starts registering
    agent.offer_proxy = True
    await until(lambda: any(r["ready"] for r in agent.registrations), what="registration")
    reg = agent.registrations[-1]
    assert reg["url"].startswith("http://127.0.0.1:")
    assert reg["inflight"] == 0
    assert await worker.finish() == 0


async def test_plain_heartbeat_names_proxied_requests(llm: FakeLLM, agent: PlainAgent,
                                                      make_worker: MakeWorker) -> None:
    await make_worker(llm.url, agent.url, proxy_port=0, proxy_advertise_url="http://w:1")
    listener = await _listener_url(agent, llm, make_worker)
    async with aiohttp.ClientSession() as s:
        r = await s.post(listener + "/api/generate", json={"chunks": 2},
                         headers={"X-Gate": "held", "Spirit-Request-Id": "req-42"})
        assert r.status == 200 and r.headers["Spirit-Request-Id"] == "req-42"
        await until(lambda: any(h["requestIDs"] == ["req-42"] for h in agent.heartbeats),
                    what="request id in heartbeat")
        async with s.get(listener + "/_spirit/proxy/metrics") as m:
            metrics = await m.json()
        assert metrics["inflight"] == 1
        llm.gate("held").set()
        assert b'"done": true' in await r.read()
        async with s.get(listener + "/_spirit/proxy/metrics") as m:
            metrics = await m.json()
    assert metrics["inflight"] == 0 and metrics["total"] >= 2  # probe + the held request
    assert metrics["duration_ms"]["max"] > 0


async def _listener_url(agent: PlainAgent, llm: FakeLLM, make_worker: MakeWorker) -> str:
    """A second worker on a fixed free port, so the test can reach it without registration."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    await make_worker(llm.url, agent.url, proxy_port=port)
    url = f"http://127.0.0.1:{port}"

    ready = False

    async def probe() -> None:
        nonlocal ready
        try:
            async with aiohttp.ClientSession() as s, s.get(url + "/") as r:
                ready = r.status == 200
        except aiohttp.ClientError:
            pass

    loop = asyncio.get_running_loop()
    end = loop.time() + 5
    while not ready:
        assert loop.time() < end, "listener not ready"
        await probe()
        await asyncio.sleep(0.02)
    return url


async def test_upstream_down_is_502(agent: PlainAgent, make_worker: MakeWorker,
                                    make_gateway: Callable[..., Awaitable[Gateway]]) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"

    async def ok() -> tuple[bool, str]:
        return True, ""

    gateway = await make_gateway()
    await make_worker(dead, gateway.agent_url(), check_start=ok)
    await until(lambda: len(gateway.ready_workers()) == 1)
    async with aiohttp.ClientSession() as s:
        async with s.post(gateway.url + "/api/generate", json={},
                          headers={"Auth": "sid1-k1"}) as r:
            assert r.status == 502
            body = await r.json()
    assert "unreachable" in body["error"] and dead in body["error"]
    assert len(gateway.ready_workers()) == 1  # the worker is fine; its LLM server is not


async def test_upstream_dying_mid_stream_cuts_the_client(
        agent: PlainAgent, make_worker: MakeWorker) -> None:
    """An LLM server that dies mid-answer: the client sees an incomplete response."""
    async def dying(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        await resp.write(json.dumps({"response": "a", "done": False}).encode() + b"\n")
        assert request.transport is not None
        request.transport.abort()
        return resp

    app = web.Application()
    app.router.add_get("/", _ok)
    app.router.add_post("/api/generate", dying)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    base = str(server.make_url("")).rstrip("/")
    fake = FakeLLM(url=base)
    try:
        listener = await _listener_url(agent, fake, make_worker)
        async with aiohttp.ClientSession() as s:
            async with s.post(listener + "/api/generate", json={}) as r:
                assert r.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await r.read()
    finally:
        await server.close()


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def test_a_refused_worker_token_is_logged_at_every_try_with_back_off(
        llm: FakeLLM, make_gateway: Callable[..., Awaitable[Gateway]],
        make_worker: MakeWorker, capsys: pytest.CaptureFixture[str]) -> None:
    gateway = await make_gateway(worker_token="right")
    worker = await make_worker(llm.url, gateway.agent_url(), worker_token="wrong",
                               heartbeat_interval=0.05)
    out = ""

    def refusals() -> list[str]:
        nonlocal out
        out += capsys.readouterr().out
        return [line for line in out.splitlines() if "proxy registration refused" in line]

    await until(lambda: len(refusals()) >= 4, timeout=10, what="four refusals logged")
    lines = [json.loads(line) for line in refusals()]
    assert all(line["level"] == "ERROR" for line in lines)
    assert "SPIRIT_WORKER_TOKEN" in lines[0]["message"]
    assert [f"refusal {n}, next try in {0.05 * 2 ** n:g}s" in line["message"]
            for n, line in enumerate(lines[:4], 1)] == [True] * 4  # backing off
    assert gateway.router.registry.workers("sid1") == []
    assert await worker.finish() == 0
