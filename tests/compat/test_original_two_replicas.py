"""The original spirit-gpu 0.1.0 worker, unmodified, behind one NATS replica while
its clients talk to another: sync, async with a webhook, a raising handler."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from tests.compat.conftest import Procs
from tests.compat.test_original_handler import connected
from tests.gateway.conftest import GatewayFactory, Webhooks

SID = "orig"
pytestmark = pytest.mark.parametrize("store", ["nats"], indirect=True)


async def test_clients_on_one_replica_are_served_by_an_original_worker_on_another(
        gateway_factory: GatewayFactory, procs: Procs, original_python: Path,
        webhooks: Webhooks) -> None:
    a = await gateway_factory(worker_token="tok")  # the clients' replica
    b = await gateway_factory(worker_token="tok")  # the worker's (through the sidecar)
    worker = procs.original(original_python, "orig_handler.py", await procs.sidecar(b, SID))
    await connected(a)

    code, body, _ = await a.call("POST", f"/v1/{SID}/sync", json_body={"input": {"x": 1}})
    assert code == 200, (body, worker.output)
    assert body["echo"] == {"x": 1}
    for replica in (a, b):
        assert (await replica.status(SID, body["requestID"]))["status"] == "succeed"

    code, body, _ = await a.call("POST", f"/v1/{SID}/sync", json_body={"input": {"raise": "boom"}})
    assert code == 500 and "boom" in body["error"], body

    code, sent, _ = await a.call("POST", f"/v1/{SID}/async",
                                 json_body={"input": {"y": 2}, "webhook": webhooks.url})
    assert code == 200, sent
    [(query, data)] = await webhooks.wait(1)
    assert query == {"requestID": sent["id"], "statusCode": "200"}
    assert json.loads(data) == {"echo": {"y": 2}, "requestID": sent["id"]}
    for replica in (a, b):
        status = await replica.status(SID, sent["id"])
        assert status["status"] == "succeed", status
        assert json.loads(base64.b64decode(status["result"]))["echo"] == {"y": 2}
    assert worker.alive(), worker.output
