"""The plain transport against an agent that is down: typed errors, one log line per
outage, reports that wait out a restart."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiohttp import web

from spirit_gpu.supervisor.jobs import Job
from spirit_gpu.supervisor.transports.base import AgentUnavailable
from spirit_gpu.supervisor.transports.plain import PlainTransport
from tests.conftest import free_port, until
from tests.fake_agent import FakeAgent


async def test_heartbeats_to_a_dead_agent_log_the_outage_once(
        capfd: pytest.CaptureFixture[str]) -> None:
    async with aiohttp.ClientSession() as session:
        plain = PlainTransport(session, f"http://127.0.0.1:{free_port()}")
        assert not plain.capabilities.batched_pulls
        for _ in range(4):
            with pytest.raises(AgentUnavailable):
                await plain.heartbeat([])
        with pytest.raises(AgentUnavailable):
            await plain.pull(1)
    out = capfd.readouterr().out
    assert out.count("unreachable") == 1
    assert "giving up" not in out


async def test_a_stream_chunk_waits_out_an_agent_restart() -> None:
    """A gateway restarting takes seconds: a chunk is retried as long as a result."""
    port = free_port()
    agent = FakeAgent(features="stream")
    async with aiohttp.ClientSession() as session:
        plain = PlainTransport(session, f"http://127.0.0.1:{port}")
        plain.features = {"stream"}
        job = Job(request_id="r1", mode="async")
        sending = asyncio.ensure_future(plain.chunk(job, 0, b'{"i": 0}'))
        # down for longer than the three tries a chunk used to get (0.3 s)
        await until(lambda: plain.outage.since is not None
                    and time.monotonic() - plain.outage.since > 0.5, 10, "an outage")
        runner = web.AppRunner(agent.app(), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", port).start()
            await asyncio.wait_for(sending, 15)
        finally:
            await runner.cleanup()
    assert agent.calls == ["POST /apis/v1/request-chunk/r1"]



async def test_an_agent_refusing_pulls_is_logged_once_and_not_as_an_outage(
        capfd: pytest.CaptureFixture[str]) -> None:
    refusing = True

    async def request(_: web.Request) -> web.Response:
        if refusing:
            return web.json_response({"error": "unauthorized: worker token"}, status=401)
        return web.Response(status=404)

    async def heartbeat(_: web.Request) -> web.Response:
        return web.Response(status=200)

    app = web.Application()
    app.router.add_get("/apis/v1/request", request)
    app.router.add_post("/apis/v1/heartbeat", heartbeat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as session:
            plain = PlainTransport(session, f"http://127.0.0.1:{port}")
            for _ in range(3):  # a worker's loop: pulls refused, heartbeats answered
                with pytest.raises(AgentUnavailable):
                    await plain.pull(1)
                await plain.heartbeat([])
            refusing = False
            assert (await plain.pull(1)).jobs == []
    finally:
        await runner.cleanup()
    out = capfd.readouterr().out
    assert out.count("refuses this worker's pulls (GET request answered 401: ") == 1
    assert "unauthorized: worker token" in out
    assert out.count("takes this worker's pulls again") == 1
    assert "unreachable" not in out and "reachable again" not in out
