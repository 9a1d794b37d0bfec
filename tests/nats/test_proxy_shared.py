"""The proxy route through NATS-backed replicas: a proxy worker registered with (and
linked to) one replica serves clients of the other. (Everything else on the route
runs against both stores in tests/proxy, marked ``BOTH_STORES``.)"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator

import aiohttp
import pytest

from tests.conftest import until
from tests.nats_server import TempNats
from tests.proxy.conftest import AUTH, SID, Gateway, Worker, llm, make_gateway, make_worker
from tests.proxy.fake_llm import FakeLLM

__all__ = ["llm", "make_gateway", "make_worker"]
MakeGateway = Callable[..., Awaitable[Gateway]]
MakeWorker = Callable[..., Awaitable[Worker]]


@pytest.fixture
def nats_url() -> Iterator[str]:
    server = TempNats()
    yield server.url
    server.close()


@pytest.fixture(params=["auto", "plain"], ids=["link", "http"])
def worker_transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_a_worker_of_replica_b_serves_clients_of_replica_a(
        nats_url: str, llm: FakeLLM, make_gateway: MakeGateway,
        make_worker: MakeWorker) -> None:
    a = await make_gateway(store=nats_url)
    b = await make_gateway(store=nats_url)
    worker = await make_worker(llm.url, b.agent_url())
    await until(lambda: len(a.ready_workers()) == 1, what="replica a learns of b's worker")
    async with aiohttp.ClientSession() as s:
        for path, body in (("/api/generate", {"chunks": 3}),
                           ("/v1/chat/completions", {"stream": True, "chunks": 3})):
            async with s.post(a.url + path, headers=AUTH, json=body) as r:
                assert r.status == 200, await r.text()
                text = await r.read()
                assert b'"done": true' in text or b"data: [DONE]" in text
        await worker.finish()
        await until(lambda: a.router.registry.workers(SID) == [], what="deregistered on a")
        async with s.post(a.url + "/api/generate", headers=AUTH, json={}) as r:
            assert r.status == 503
