"""Shared set-up of the proxy tests: a fake LLM server, gateways and workers.

Everything listens on 127.0.0.1 with ephemeral ports. The gateway is the real
``create_app`` behind the connection guard, with aiohttp's production default
``handler_cancellation=False``
unless a test asks otherwise, on the store of ``tests/conftest.py``'s ``store``
fixture (memory unless a test is marked ``BOTH_STORES``: then also on a NATS
JetStream server of its own); workers run ``serve_proxy`` as a task (the end-to-end tests start real
supervisor processes through ``tests/conftest.py``'s ``worker_factory``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestServer

from spirit_gpu.config import WorkerConfig
from spirit_gpu.gateway.app import create_app
from spirit_gpu.gateway.config import GatewayConfig
from spirit_gpu.gateway.conn_guard import ConnGuard
from spirit_gpu.gateway.proxy.route import ROUTER_KEY, ProxyRouter
from spirit_gpu.gateway.service import GATEWAY_KEY
from spirit_gpu.gateway.service import Gateway as Core
from spirit_gpu.supervisor.proxy.worker import serve_proxy
from tests.proxy.fake_llm import FakeLLM

SID = "sid1"
KEY = "k1"
AUTH = {"Auth": f"{SID}-{KEY}"}
# the route's tests that touch what the store holds (the proxy registry shared over
# NATS, has_worker before a 503, the queued proxy jobs) run on both stores
BOTH_STORES = pytest.mark.parametrize("store", ["memory", "nats"], indirect=True)


def http_check(base_url: str) -> Callable[[], Awaitable[tuple[bool, str]]]:
    async def check() -> tuple[bool, str]:
        try:
            async with aiohttp.ClientSession() as s, s.get(base_url + "/") as r:
                return r.status == 200, ""
        except aiohttp.ClientError as exc:
            return False, repr(exc)
    return check


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item
                                  ) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The lean client's tests run on uvloop too; the rest on asyncio's loop only."""
    if item.path.name == "test_proxy_client.py":
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture
async def llm() -> AsyncIterator[FakeLLM]:
    fake = FakeLLM()
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    fake.url = str(server.make_url("")).rstrip("/")
    yield fake
    for gate in fake.gates.values():
        gate.set()
    await server.close()


@dataclass
class Gateway:
    url: str
    config: GatewayConfig
    router: ProxyRouter
    core: Core  # the public and agent APIs' side: its store holds the queued proxy jobs

    def agent_url(self, sid: str = SID) -> str:
        return f"{self.url}/agent/{sid}"

    def ready_workers(self, sid: str = SID) -> list[Any]:
        return [w for w in self.router.registry.workers(sid) if w.ready]

    def linked(self, sid: str = SID) -> int:
        """How many of the worker entries have a proxy link up."""
        registry = self.router.registry
        return sum(1 for w in registry.workers(sid)
                   if (entry := registry.get(sid, w.workerID)) and entry.link is not None)


@pytest.fixture
async def make_gateway(store: str) -> AsyncIterator[Callable[..., Awaitable[Gateway]]]:
    runners: list[tuple[web.AppRunner, asyncio.Server]] = []

    async def make(handler_cancellation: bool = False, **values: Any) -> Gateway:
        values.setdefault("api_keys", [KEY])
        values.setdefault("lease_seconds", 2.0)
        values.setdefault("store", store)
        cfg = GatewayConfig(**values)
        app = create_app(cfg)
        # behind the connection guard, as the CLI serves it (it tells a handler that
        # its client left)
        guard = ConnGuard(cfg.head_timeout, cfg.body_timeout, cfg.max_connections)
        guard.install(app)
        runner = web.AppRunner(app, handler_cancellation=handler_cancellation, access_log=None)
        await runner.setup()
        server = await guard.listen(runner, "127.0.0.1", 0)
        runners.append((runner, server))
        port = server.sockets[0].getsockname()[1]
        return Gateway(f"http://127.0.0.1:{port}", cfg, app[ROUTER_KEY], app[GATEWAY_KEY])

    yield make
    for runner, server in runners:
        server.close()
        await runner.cleanup()


@dataclass
class Worker:
    cfg: WorkerConfig
    stop: asyncio.Event
    task: asyncio.Task[int]
    exit_code: int | None = None

    async def finish(self, within: float = 10.0) -> int:
        self.stop.set()
        self.exit_code = await asyncio.wait_for(self.task, within)
        return self.exit_code


@pytest.fixture
def worker_transport() -> str:
    """``auto``: exchanges over the proxy link; ``plain``: HTTP to the worker's listener."""
    return "auto"


@pytest.fixture
async def make_worker(worker_transport: str) -> AsyncIterator[Callable[..., Awaitable[Worker]]]:
    workers: list[Worker] = []

    async def make(base_url: str, agent_url: str,
                   check_start: Callable[[], Awaitable[tuple[bool, str]]] | None = None,
                   **values: Any) -> Worker:
        values.setdefault("transport", worker_transport)
        values.setdefault("heartbeat_interval", 0.1)
        values.setdefault("grace_period", 2.0)
        cfg = WorkerConfig(agent_url=agent_url, **values)
        stop = asyncio.Event()
        task = asyncio.create_task(serve_proxy(cfg, base_url, check_start or http_check(base_url),
                                               stop))
        worker = Worker(cfg, stop, task)
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        if not worker.task.done():
            await worker.finish()
