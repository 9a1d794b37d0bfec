"""Requests the gateway ends get their webhook from the gateway; the first end wins;
workers without an id of their own get leases per request."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

from spirit_gpu.gateway.service import GATEWAY_KEY
from tests.compat.conftest import Procs, seen
from tests.conftest import until
from tests.gateway.conftest import GatewayFactory, PlainWorker, Webhooks

SID = "ends"


async def test_ttl_expiry_in_the_queue_sends_the_webhook(
        gateway_factory: GatewayFactory, webhooks: Webhooks) -> None:
    gw = await gateway_factory()
    code, sent, _ = await gw.call("POST", f"/v1/{SID}/async", json_body={
        "input": 1, "webhook": webhooks.url, "policy": {"ttl": 50}})
    assert code == 200, sent
    [(query, data)] = await webhooks.wait(1)
    assert query == {"requestID": sent["id"], "statusCode": "408"}
    assert "ttl" in json.loads(data)["error"]
    assert (await gw.status(SID, sent["id"]))["statusCode"] == 408


async def test_lost_worker_and_cancel_send_the_webhook(
        gateway_factory: GatewayFactory, webhooks: Webhooks) -> None:
    gw = await gateway_factory(lease_seconds=0.5)
    ids = []
    for _ in range(2):
        code, sent, _ = await gw.call("POST", f"/v1/{SID}/async",
                                      json_body={"input": 1, "webhook": webhooks.url})
        ids.append(sent["id"])
    worker = PlainWorker(gw, SID, worker_id="w1")
    for _ in ids:
        _, env = await worker.pull()
        assert env is not None
        await worker.executing(env["headers"]["Ease-Request-Id"])
    code, _, _ = await gw.call("DELETE", f"/v1/{SID}/async", params={"requestID": ids[0]})
    assert code == 200
    # the worker goes silent: the other one is lost
    received = await webhooks.wait(2)
    by_id = {q["requestID"]: (q["statusCode"], json.loads(d)) for q, d in received}
    assert by_id[ids[0]][0] == "499"
    assert by_id[ids[1]][0] == "500" and "worker lost" in by_id[ids[1]][1]["error"]


async def test_workers_without_an_id_on_one_host_have_leases_per_request(
        gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(lease_seconds=0.5)
    code, sent, _ = await gw.call("POST", f"/v1/{SID}/async",
                                  json_body={"input": 1, "webhook": "http://127.0.0.1:9/x"})
    dead, neighbour = PlainWorker(gw, SID), PlainWorker(gw, SID)  # same address, no id
    _, env = await dead.pull()
    assert env is not None
    rid = env["headers"]["Ease-Request-Id"]
    await dead.executing(rid)
    keep_polling = True

    async def poll_forever() -> None:
        while keep_polling:
            await neighbour.pull()
            await neighbour.heartbeat([])
            await asyncio.sleep(0.05)
    task = asyncio.create_task(poll_forever())
    try:
        async def failed() -> bool:
            return (await gw.status(SID, rid))["status"] == "failed"
        await until(failed, 10, "the silent worker's job failed")
    finally:
        keep_polling = False
        await task
    assert "worker lost" in (await gw.status(SID, rid))["message"]


async def test_heartbeats_naming_the_request_keep_it(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(lease_seconds=0.5)
    code, sent, _ = await gw.call("POST", f"/v1/{SID}/async",
                                  json_body={"input": 1, "webhook": "http://127.0.0.1:9/x"})
    worker = PlainWorker(gw, SID)
    _, env = await worker.pull()
    assert env is not None
    rid = env["headers"]["Ease-Request-Id"]
    await worker.executing(rid)
    for _ in range(15):  # 1.5 s: three leases
        await worker.heartbeat([rid])
        await asyncio.sleep(0.1)
    assert (await gw.status(SID, rid))["status"] == "executing"


async def test_a_worker_ignoring_cancel_cannot_report_200_after_it(
        gateway_factory: GatewayFactory, procs: Procs, original_python: Path,
        webhooks: Webhooks) -> None:
    gw = await gateway_factory()
    agent_url = await procs.sidecar(gw, SID)
    worker = procs.original(original_python, "orig_handler.py", agent_url)
    code, sent, _ = await gw.call("POST", f"/v1/{SID}/async", json_body={
        "input": {"sleep": 1}, "webhook": webhooks.url})
    rid = sent["id"]
    await seen(worker, "sleeping 1")
    code, _, _ = await gw.call("DELETE", f"/v1/{SID}/async", params={"requestID": rid})
    assert code == 200
    # the original runs it to the end anyway; it logs this after its webhook call
    await seen(worker, "finish handle request")
    [(query, _)] = await webhooks.wait(1)
    assert query["statusCode"] == "499"
    status = await gw.status(SID, rid)
    assert status["status"] == "cancelled" and status["statusCode"] == 499
    # its own webhook call went to the gateway's relay, which dropped it
    assert len(webhooks.received) == 1, webhooks.received
    storage = gw.app[GATEWAY_KEY].storage
    rec = await storage.get(SID, rid)
    assert rec is not None and rec.status == "cancelled"
    # the worker serves on; a batch status reads both ends and an unknown id
    code, body, _ = await gw.call("POST", f"/v1/{SID}/sync", json_body={"input": {"n": 1}})
    assert code == 200 and body["echo"] == {"n": 1}, body
    code, batch, _ = await gw.call("POST", f"/v1/{SID}/status",
                                   json_body={"requestIDs": [rid, body["requestID"], "nope"]})
    assert code == 200, batch
    assert [(s["status"], s["statusCode"]) for s in batch["statuses"]] == [
        ("cancelled", 499), ("succeed", 200), ("notFound", 404)]
    assert len(webhooks.received) == 1, webhooks.received


async def test_a_sync_requests_webhook_goes_through_the_relay(
        gateway_factory: GatewayFactory, webhooks: Webhooks) -> None:
    gw = await gateway_factory()
    call = asyncio.create_task(gw.call("POST", f"/v1/{SID}/sync",
                                       json_body={"input": 1, "webhook": webhooks.url}))
    worker = PlainWorker(gw, SID)
    env = None
    while env is None:
        _, env = await worker.pull(wait_ms=500)
    rid = env["headers"]["Ease-Request-Id"]
    relay = env["headers"]["Ease-Webhook"]
    assert relay == f"{gw.url}/agent/{SID}/apis/v1/webhook/{rid}"
    async with gw.session.post(relay, params={"requestID": rid, "statusCode": "200"},
                               data=b'{"ok": 1}') as resp:
        assert resp.status == 200  # what the client's webhook answered
    [(query, data)] = await webhooks.wait(1)
    assert query == {"requestID": rid, "statusCode": "200"} and data == b'{"ok": 1}'
    code, body, _ = await call  # the webhook call was the first end: the sync answer
    assert (code, body) == (200, {"ok": 1})


async def test_a_failed_metric_without_result_is_the_end(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(lease_seconds=0.5)
    ids = []
    for _ in range(2):
        code, sent, _ = await gw.call("POST", f"/v1/{SID}/async",
                                      json_body={"input": 1, "webhook": "http://127.0.0.1:9/x"})
        ids.append(sent["id"])
    worker = PlainWorker(gw, SID)  # as the original: no id, plain protocol
    for rid, message in zip(ids, ["failed to parse input by using json, err: 'input'",
                                  "request enqueue time exceed ttl 1 milliseconds, drop it"],
                            strict=True):
        _, env = await worker.pull()
        assert env is not None and env["headers"]["Ease-Request-Id"] == rid
        code, _ = await worker.post(f"request-metric/{rid}", {"status": "failed",
                                                               "message": message})
        assert code == 200
        status = await gw.status(SID, rid)  # at once, before any ack
        assert status["status"] == "failed" and status["message"] == message
        assert json.loads(base64.b64decode(status["result"])) == {"error": message}
        await worker.post(f"request-ack/{rid}")
    assert (await gw.status(SID, ids[0]))["statusCode"] == 500
    assert (await gw.status(SID, ids[1]))["statusCode"] == 408
    # a result after it changes nothing (the original posts one after a failed metric)
    await worker.result(ids[0], 200, b'{"late": true}')
    assert (await gw.status(SID, ids[0]))["status"] == "failed"
    # and nothing is handed out again, however long the worker keeps polling
    for _ in range(8):
        code, env = await worker.pull()
        assert env is None
        await asyncio.sleep(0.1)
