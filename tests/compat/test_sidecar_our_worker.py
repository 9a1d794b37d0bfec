"""Our workers behind ``spirit-gpu agent``: the proxy-mode one (the sidecar offers no
registration, as the hosted agent, so the gateway's proxy route sends requests through
the queue) and the handler-mode one, whose webhooks go through the sidecar too."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import aiohttp

from spirit_gpu.config import WorkerConfig
from spirit_gpu.gateway.service import GATEWAY_KEY
from spirit_gpu.supervisor.proxy.worker import serve_proxy
from tests.compat.conftest import Procs
from tests.conftest import Worker, until
from tests.gateway.conftest import APPS, GatewayFactory, Gw, Webhooks
from tests.proxy.conftest import http_check
from tests.proxy.fake_llm import FakeLLM

SID = "ours"
KEY = "pk"


async def polling(gw: Gw, what: str, worker: Worker | None = None) -> None:
    """Until the gateway counts a worker of SID (``worker``: its process still alive)."""
    async def counted() -> bool:
        assert worker is None or worker.proc.poll() is None, worker.output
        return await gw.app[GATEWAY_KEY].storage.worker_count(SID) > 0
    await until(counted, 20, what)


async def test_queued_proxy_jobs_end_to_end(gateway_factory: GatewayFactory, procs: Procs,
                                            llm: FakeLLM) -> None:
    gw = await gateway_factory(api_keys=[KEY], worker_token="tok")
    agent_url = await procs.sidecar(gw, SID)
    cfg = WorkerConfig(agent_url=agent_url, heartbeat_interval=0.2, pull_backoff_max=0.05,
                       grace_period=2.0)
    stop = asyncio.Event()
    worker = asyncio.create_task(serve_proxy(cfg, llm.url, http_check(llm.url), stop))
    try:
        await polling(gw, "our worker polling through the sidecar")
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


async def test_a_handler_workers_webhook_goes_through_the_sidecar(
        gateway_factory: GatewayFactory, procs: Procs, webhooks: Webhooks,
        worker_factory: Callable[..., Worker]) -> None:
    # the gateway hands out its webhook relay as the sidecar's own /apis/v1/webhook/<id>:
    # our worker calls no agent path but its own agent's relay
    gw = await gateway_factory(worker_token="tok")
    agent_url = await procs.sidecar(gw, SID)
    worker = worker_factory(str(APPS / "double.py"), {
        "EASE_AGENT_URL": agent_url, "EASE_HEARTBEAT_INTERVAL": "0.2",
        "SPIRIT_PULL_BACKOFF_MAX": "0.05"})
    await polling(gw, "our worker polling through the sidecar", worker)
    code, body, _ = await gw.call("POST", f"/v1/{SID}/async", json_body={
        "input": {"x": 4}, "webhook": webhooks.url})
    assert code == 200
    ((query, data),) = await webhooks.wait(1)
    assert query["requestID"] == body["id"] and query["statusCode"] == "200"
    assert json.loads(data) == {"doubled": 8}
    status = await gw.status(SID, body["id"])
    assert (status["status"], status["message"]) == ("succeed", "")
    assert "webhook refused" not in worker.output


async def test_a_sidecar_without_a_token_passes_on_the_workers_own(
        gateway_factory: GatewayFactory, procs: Procs,
        worker_factory: Callable[..., Worker]) -> None:
    gw = await gateway_factory(worker_token="tok")
    agent_url = await procs.sidecar(gw, SID, token="")
    worker = worker_factory(str(APPS / "double.py"), {
        "EASE_AGENT_URL": agent_url, "SPIRIT_WORKER_TOKEN": "tok",
        "SPIRIT_PULL_BACKOFF_MAX": "0.05"})
    await polling(gw, "our worker polling through the sidecar with its own token", worker)
    code, body, _ = await gw.call("POST", f"/v1/{SID}/sync", json_body={"input": {"x": 5}})
    assert (code, body) == (200, {"doubled": 10})
