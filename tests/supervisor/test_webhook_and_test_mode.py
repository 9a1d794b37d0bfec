"""Webhook delivery (retry, final failure) and the EASE_TEST_MODE server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import free_port, wait_exit, worker_env
from tests.fake_agent import FakeAgent


class Hook:
    def __init__(self, failures: int, status: int = 500) -> None:
        self.failures = failures
        self.status = status
        self.calls: list[tuple[dict[str, str], bytes, str]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.calls.append((dict(request.query), await request.read(),
                           request.headers.get("Content-Type", "")))
        if len(self.calls) <= self.failures:
            return web.Response(status=self.status)
        return web.Response(status=200)


@pytest.fixture
async def hook_server() -> AsyncIterator[object]:
    runners: list[web.AppRunner] = []

    async def make(failures: int, status: int = 500) -> Hook:
        hook = Hook(failures, status)
        app = web.Application()
        app.router.add_post("/hook", hook.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        hook.url = f"http://127.0.0.1:{port}/hook"
        return hook

    yield make
    for r in runners:
        await r.cleanup()


async def test_async_webhook_is_retried_until_delivered(agent: FakeAgent, worker_factory,
                                                        hook_server) -> None:
    hook = await hook_server(2)
    agent.enqueue("w1", {"input": {"x": 5}, "webhook": hook.url}, mode="async")
    worker_factory("behave.py", worker_env(agent, SPIRIT_WEBHOOK_BACKOFF="0.05"))
    await agent.wait_for(lambda: "w1" in agent.acks)
    assert len(hook.calls) == 3
    query, body, ctype = hook.calls[-1]
    assert query == {"requestID": "w1", "statusCode": "200"}
    assert json.loads(body)["y"] == 10 and ctype == "application/json"
    assert agent.metrics["w1"][-1]["status"] == "succeed"
    assert "webhook" not in agent.metrics["w1"][-1]["message"]


async def test_sync_webhook_from_header(agent: FakeAgent, worker_factory, hook_server) -> None:
    hook = await hook_server(0)
    agent.enqueue("s1", {"input": {"x": 1}}, webhook=hook.url)
    worker_factory("behave.py", worker_env(agent))
    await agent.wait_for(lambda: "s1" in agent.acks)
    assert hook.calls and hook.calls[0][0]["requestID"] == "s1"


async def test_dead_webhook_failure_is_recorded_in_the_status(agent: FakeAgent, worker_factory,
                                                              hook_server) -> None:
    hook = await hook_server(100)
    agent.enqueue("w2", {"input": {"x": 5}, "webhook": hook.url}, mode="async")
    agent.enqueue("w3", {"input": {"x": 5}, "webhook": "http://127.0.0.1:9/nothing"},
                  mode="async")
    worker_factory("behave.py", worker_env(agent, SPIRIT_WEBHOOK_BACKOFF="0.01",
                                           SPIRIT_WEBHOOK_ATTEMPTS="3"))
    await agent.wait_for(lambda: {"w2", "w3"} <= set(agent.acks))
    assert len(hook.calls) == 3
    assert agent.results["w2"]["statusCode"] == 200  # the result itself is still reported
    assert ("webhook delivery failed after 3 tries: webhook answered 500"
            in agent.metrics["w2"][-1]["message"])
    assert "webhook unreachable" in agent.metrics["w3"][-1]["message"]


async def test_webhook_4xx_is_not_retried(agent: FakeAgent, worker_factory, hook_server) -> None:
    hook = await hook_server(100, status=404)
    agent.enqueue("w4", {"input": {}, "webhook": hook.url}, mode="async")
    worker_factory("behave.py", worker_env(agent))
    await agent.wait_for(lambda: "w4" in agent.acks)
    assert len(hook.calls) == 1
    assert "answered 404" in agent.metrics["w4"][-1]["message"]


async def wait_until_serving(session: aiohttp.ClientSession, url: str) -> None:
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        try:
            async with session.post(url, data=b'{"input": {}}') as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        assert asyncio.get_running_loop().time() < deadline, "test server never answered"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("in_process", ["0", "1"])
async def test_test_mode_serves_post_root(worker_factory, in_process: str) -> None:
    port = free_port()
    worker_factory("behave.py", {"EASE_TEST_MODE": "true", "EASE_TEST_PORT": str(port),
                                 "SPIRIT_IN_PROCESS": in_process})
    url = f"http://127.0.0.1:{port}/"
    async with aiohttp.ClientSession() as session:
        await wait_until_serving(session, url)
        async with session.post(url, data=b'{"input": {"x": 21}}') as resp:
            body = await resp.json()
            assert resp.status == 200 and body["y"] == 42
            assert body["meta"]["requestID"].startswith("test-")
        async with session.post(url, data=b"not json") as resp:
            assert resp.status == 400 and "error" in await resp.json()
        async with session.post(url, data=b'{"input": {"raise": "no"}}') as resp:
            assert resp.status == 500 and await resp.json() == {"error": "RuntimeError: no"}
        huge = b'{"input": "' + b"x" * (20 * 1024 * 1024) + b'"}'
        async with session.post(url, data=huge) as resp:
            assert resp.status == 413 and "too large" in (await resp.json())["error"]


async def test_test_mode_exits_unhealthy_after_max_crashes(worker_factory) -> None:
    port = free_port()
    w = worker_factory("behave.py", {"EASE_TEST_MODE": "true", "EASE_TEST_PORT": str(port),
                                     "SPIRIT_MAX_CRASHES": "2",
                                     "SPIRIT_CRASH_BACKOFF_MAX": "0.1"})
    url = f"http://127.0.0.1:{port}/"
    async with aiohttp.ClientSession() as session:
        await wait_until_serving(session, url)
        for _ in range(2):
            async with session.post(url, data=b'{"input": {"exit": 7}}') as resp:
                assert resp.status == 500  # each crash answers its own request
    assert await wait_exit(w, 30) == 4  # as against a platform: no third process
    assert "worker unhealthy" in w.output and "not replaced" in w.output
