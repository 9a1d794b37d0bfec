"""The agent sidecar while its gateway is away: each relayed call answers 502 at once,
and the outage is logged once when it starts and once when it ends."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from spirit_gpu.gateway.sidecar import Sidecar
from tests.conftest import free_port
from tests.gateway.conftest import GatewayFactory


async def test_a_gateway_away_is_logged_once_each_way(
        gateway_factory: GatewayFactory, capfd: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    sidecar = Sidecar(f"http://127.0.0.1:{port}", "s")
    runner = web.AppRunner(sidecar.app(), access_log=None)
    await runner.setup()
    own = free_port()
    await web.TCPSite(runner, "127.0.0.1", own).start()
    url = f"http://127.0.0.1:{own}/apis/v1/request"
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(5):  # a worker polling meanwhile
                async with s.get(url) as r:
                    assert r.status == 502
                    assert "gateway unreachable" in (await r.json())["error"]
            await gateway_factory(port=port)
            async with s.get(url) as r:
                assert r.status == 404  # the gateway's own answer: no job queued
    finally:
        await runner.cleanup()
    out = capfd.readouterr().out
    assert out.count(f"gateway at http://127.0.0.1:{port}/agent/s unreachable") == 1, out
    assert out.count("reachable again") == 1, out
