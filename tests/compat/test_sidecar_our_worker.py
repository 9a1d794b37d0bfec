"""Our proxy-mode worker behind ``spirit-gpu agent``: the sidecar offers no registration
(as the hosted agent), so the gateway's proxy route sends requests through the queue."""

from __future__ import annotations

import asyncio

import aiohttp

from spirit_gpu.config import WorkerConfig
from spirit_gpu.gateway.service import GATEWAY_KEY
from spirit_gpu.supervisor.proxy.worker import serve_proxy
from tests.compat.conftest import Procs
from tests.conftest import until
from tests.gateway.conftest import GatewayFactory
from tests.proxy.conftest import http_check
from tests.proxy.fake_llm import FakeLLM

SID = "ours"
KEY = "pk"


async def test_queued_proxy_jobs_end_to_end(gateway_factory: GatewayFactory, procs: Procs,
                                            llm: FakeLLM) -> None:
    gw = await gateway_factory(api_keys=[KEY], worker_token="tok")
    agent_url = await procs.sidecar(gw, SID)
    cfg = WorkerConfig(agent_url=agent_url, heartbeat_interval=0.2, pull_backoff_max=0.05,
                       grace_period=2.0)
    stop = asyncio.Event()
    worker = asyncio.create_task(serve_proxy(cfg, llm.url, http_check(llm.url), stop))
    try:
        async def polling() -> bool:
            return await gw.app[GATEWAY_KEY].storage.worker_count(SID) > 0
        await until(polling, 20, "our worker polling through the sidecar")
        auth = {"Auth": f"{SID}-{KEY}"}
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{gw.url}/api/chat", headers=auth, json={"chunks": 4}) as r:
                assert r.status == 200
                lines = (await r.read()).splitlines()
            assert len(lines) == 5
            async with s.get(f"{gw.url}/v1/models", headers=auth) as r:
                assert r.status == 200
                assert (await r.json())["data"][0]["id"] == "llama3.2"
        # our worker's pulls name it (Spirit-Worker-Id): the sidecar passes that on
        seen = gw.app[GATEWAY_KEY].storage._sids[SID].workers  # type: ignore[attr-defined]
        assert any(not w.startswith("shared:") for w in seen), seen
    finally:
        stop.set()
        assert await asyncio.wait_for(worker, 15) == 0
