"""A misspelled serverless id is told apart from one whose workers are busy or gone."""

from __future__ import annotations

import asyncio

from spirit_gpu.gateway.service import GATEWAY_KEY
from tests.conftest import until
from tests.gateway.conftest import GatewayFactory, Gw, PlainWorker

NEVER = ("no worker has connected for serverless id 'typo' since this gateway started: "
         "check the id (workers "
         "connect with EASE_AGENT_URL=<gateway>/agent/typo)")


async def test_sync_to_an_id_no_worker_ever_used_says_check_the_id(gw: Gw) -> None:
    code, body, _ = await gw.call("POST", "/v1/typo/sync", json_body={"input": 1})
    assert (code, body) == (503, {"error": f"not enough gpu now: {NEVER}"})


async def test_async_to_an_unknown_id_warns_and_its_status_says_why_it_waits(gw: Gw) -> None:
    code, body, resp = await gw.call("POST", "/v1/typo/async",
                                     json_body={"input": 1, "webhook": "http://127.0.0.1:9/h"})
    assert code == 200 and resp.headers["Spirit-Warning"] == NEVER
    st = await gw.status("typo", body["id"])
    assert (st["status"], st["message"]) == ("queueing", f"queued: {NEVER}")
    code, batch, _ = await gw.call("POST", "/v1/typo/status",
                                   json_body={"requestIDs": [body["id"]]})
    assert batch["statuses"][0]["message"] == f"queued: {NEVER}"


async def test_an_id_whose_workers_left_is_not_called_unknown(
        gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(lease_seconds=0.1)
    await PlainWorker(gw, "gone").heartbeat([])
    storage = gw.app[GATEWAY_KEY].storage

    async def stale() -> bool:  # forgotten after 3 leases by the sweep
        return await storage.worker_count("gone") == 0 and not \
            storage._sids["gone"].workers  # type: ignore[attr-defined]
    await until(stale, 10, "the worker is forgotten")
    code, body, _ = await gw.call("POST", "/v1/gone/sync", json_body={"input": 1})
    assert (code, body["error"]) == (503, "not enough gpu now: no worker of serverless id "
                                          "'gone' is connected right now; retry later")
    code, acc, resp = await gw.call("POST", "/v1/gone/async",
                                    json_body={"input": 1, "webhook": "http://127.0.0.1:9/h"})
    assert "Spirit-Warning" not in resp.headers
    assert (await gw.status("gone", acc["id"]))["message"] == ""


async def test_sync_timeout_message_says_what_timed_out(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(sync_timeout=0.3)
    worker = PlainWorker(gw, "slow")
    await worker.heartbeat([])
    call = asyncio.ensure_future(gw.call("POST", "/v1/slow/sync", json_body={"input": 1}))
    # the worker takes it and never answers (a request left queued would instead end
    # by its TTL, which equals the sync timeout, whichever clock fires first)
    code, _ = await worker.pull(wait_ms=5000)
    assert code == 200
    code, body, _ = await call
    assert (code, body) == (408, {"error": "request timeout: no result within 0.3 s"})
