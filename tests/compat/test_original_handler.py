"""The original spirit-gpu 0.1.0 worker, unmodified, in handler mode against our gateway."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from spirit_gpu.gateway.service import GATEWAY_KEY
from tests.compat.conftest import Proc, Procs, seen
from tests.conftest import until
from tests.gateway.conftest import GatewayFactory, Gw, Webhooks
from tests.proxy.fake_llm import FakeLLM

SID = "orig"


async def connected(gw: Gw, sid: str = SID) -> None:
    async def present() -> bool:
        return await gw.app[GATEWAY_KEY].storage.worker_count(sid) > 0
    await until(present, 30, "the original worker polling")


async def sync_async_webhook_and_raise(client: Gw, readers: tuple[Gw, ...], webhooks: Webhooks,
                                       worker: Proc) -> None:
    """Requests through ``client`` to the original worker (sync, a raising handler, async
    with its webhook, async raising); each one's status read through every one of
    ``readers``."""
    code, body, _ = await client.call("POST", f"/v1/{SID}/sync", json_body={"input": {"x": 1}})
    assert code == 200, (body, worker.output)
    assert body["echo"] == {"x": 1} and body["requestID"]
    for gw in readers:
        assert (await gw.status(SID, body["requestID"]))["status"] == "succeed"

    code, body, _ = await client.call("POST", f"/v1/{SID}/sync",
                                      json_body={"input": {"raise": "boom"}})
    assert code == 500 and "boom" in body["error"], body

    code, sent, _ = await client.call("POST", f"/v1/{SID}/async",
                                      json_body={"input": {"y": 2}, "webhook": webhooks.url})
    assert code == 200, sent
    [(query, data)] = await webhooks.wait(1)
    assert query == {"requestID": sent["id"], "statusCode": "200"}
    assert json.loads(data) == {"echo": {"y": 2}, "requestID": sent["id"]}
    for gw in readers:
        status = await gw.status(SID, sent["id"])
        assert status["status"] == "succeed" and status["statusCode"] == 200
        assert json.loads(base64.b64decode(status["result"]))["echo"] == {"y": 2}

    code, failed, _ = await client.call("POST", f"/v1/{SID}/async",
                                        json_body={"input": {"raise": "async boom"},
                                                   "webhook": webhooks.url})
    received = await webhooks.wait(2)
    query, data = received[1]
    assert query == {"requestID": failed["id"], "statusCode": "500"}
    assert "async boom" in json.loads(data)["error"]
    for gw in readers:
        status = await gw.status(SID, failed["id"])
        assert status["status"] == "failed" and status["statusCode"] == 500
        assert "async boom" in status["message"]
    assert worker.alive(), worker.output


async def test_sync_async_webhook_and_raise_via_the_sidecar(
        gateway_factory: GatewayFactory, procs: Procs, original_python: Path,
        webhooks: Webhooks) -> None:
    gw = await gateway_factory(worker_token="tok")
    agent_url = await procs.sidecar(gw, SID)
    worker = procs.original(original_python, "orig_handler.py", agent_url)
    await connected(gw)

    await sync_async_webhook_and_raise(gw, (gw,), webhooks, worker)


async def test_agent_url_with_a_path_prefix_says_what_to_do(
        gw: Gw, procs: Procs, original_python: Path) -> None:
    """The original drops the path of EASE_AGENT_URL: the gateway root refuses loudly."""
    worker = procs.original(original_python, "orig_handler.py", f"{gw.url}/agent/{SID}")
    await seen(worker, "spirit-gpu agent --gateway")
    assert "failed to get task: 400" in worker.output


async def test_failed_metric_without_result_ends_the_request_at_once(
        gateway_factory: GatewayFactory, procs: Procs, original_python: Path,
        llm: FakeLLM) -> None:
    """A job the original cannot parse gets a failed metric and an ack, no result."""
    gw = await gateway_factory()
    agent_url = await procs.sidecar(gw, SID)
    procs.original(original_python, "orig_proxy.py", agent_url, LLM_URL=llm.url)
    await connected(gw)
    # a proxy-mode worker given a handler job: not {"method", "uri", ...}
    code, body, _ = await gw.call("POST", f"/v1/{SID}/sync", json_body={"input": {"x": 1}})
    assert code == 500, body
    assert "failed to parse input" in body["error"]
    rid = _only_request(gw)
    rec = await gw.app[GATEWAY_KEY].storage.get(SID, rid)
    assert rec is not None and rec.status == "failed" and rec.deliveries == 1


def _only_request(gw: Gw) -> str:
    storage = gw.app[GATEWAY_KEY].storage
    ids = list(storage._entries)  # type: ignore[attr-defined]
    assert len(ids) == 1, ids
    return str(ids[0])


async def test_two_workers_on_one_sidecar_a_killed_ones_job_fails(
        gateway_factory: GatewayFactory, procs: Procs, original_python: Path) -> None:
    """Shared identity, leases per request: the neighbour's polling keeps nothing alive."""
    gw = await gateway_factory(lease_seconds=3.0)
    agent_url = await procs.sidecar(gw, SID)
    a = procs.original(original_python, "orig_handler.py", agent_url)
    b = procs.original(original_python, "orig_handler.py", agent_url)
    await connected(gw)
    code, sent, _ = await gw.call("POST", f"/v1/{SID}/async",
                                  json_body={"input": {"sleep": 60}, "webhook": "http://127.0.0.1:9/x"})
    assert code == 200, sent
    rid = sent["id"]

    async def running() -> Procs | bool:
        return any("sleeping 60" in p.output and rid in p.output for p in (a, b))
    await until(running, 30, "the job running")
    victim, neighbour = (a, b) if rid in a.output else (b, a)
    victim.kill()

    async def ended() -> bool:
        return (await gw.status(SID, rid))["status"] == "failed"
    await until(ended, 20, "the killed worker's job failed")
    status = await gw.status(SID, rid)
    assert "worker lost" in status["message"]
    assert neighbour.alive()
    # the neighbour still serves
    code, body, _ = await gw.call("POST", f"/v1/{SID}/sync", json_body={"input": {"z": 3}})
    assert code == 200 and body["echo"] == {"z": 3}, body

