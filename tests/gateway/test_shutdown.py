"""A gateway shutting down answers the sync clients still waiting, instead of cutting them."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from spirit_gpu.gateway.app import create_app
from spirit_gpu.gateway.config import GatewayConfig
from tests.conftest import free_port, until
from tests.gateway.conftest import AUTH, BOTH_STORES, KEY

pytestmark = BOTH_STORES


async def test_a_sync_client_waiting_when_the_gateway_stops_gets_503_with_its_request(
        store: str) -> None:
    app = create_app(GatewayConfig(api_keys=[KEY], store=store))
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=10.0)
    await runner.setup()
    url = f"http://127.0.0.1:{free_port()}"
    await web.TCPSite(runner, "127.0.0.1", int(url.rsplit(":", 1)[1])).start()
    stopped = False
    try:
        async with aiohttp.ClientSession() as session:
            async def pull() -> str:  # a worker takes the job and never answers
                async with session.get(f"{url}/agent/s/apis/v1/request",
                                       params={"wait": "100"}) as resp:
                    job = await resp.json() if resp.status == 200 else {}
                    return str(job["headers"]["Ease-Request-Id"]) if job else ""
            assert await pull() == ""  # (now the id has a worker)

            async def call() -> tuple[int, dict[str, str]]:
                async with session.post(f"{url}/v1/s/sync", json={"input": {}},
                                        headers=AUTH) as resp:
                    return resp.status, await resp.json()
            waiting = asyncio.create_task(call())
            rid = await until(pull, 10, "the job taken")
            cleanup = asyncio.create_task(runner.cleanup())
            stopped = True
            code, body = await asyncio.wait_for(waiting, 8)  # before the 10 s shutdown limit
            await cleanup
    finally:
        if not stopped:
            await runner.cleanup()
    assert code == 503, body
    assert body["error"].startswith(f"gateway shutting down: request {rid} ")
    assert ("another gateway replica" if store != "memory" else "is lost") in body["error"]
