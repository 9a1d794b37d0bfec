"""On NATS a worker's "executing" is written behind (with the delivery, 100 ms later):
the link confirms it only once it is written, so a replica that dies before the
write leaves the worker holding it, to send again through another replica."""

from __future__ import annotations

import pytest

from spirit_gpu.protocol import link as lp
from tests.gateway.conftest import GatewayFactory, Gw

pytestmark = pytest.mark.parametrize("store", ["nats"], indirect=True)
HOOK = "http://127.0.0.1:9/h"


async def _status(gw: Gw, sid: str, rid: str) -> str:
    return str((await gw.status(sid, rid))["status"])


async def test_executing_is_confirmed_only_once_every_replica_reads_it(
        gateway_factory: GatewayFactory) -> None:
    a, b = await gateway_factory(), await gateway_factory()
    ws = await b.session.ws_connect(f"{b.agent('cf')}/link",
                                    headers={lp.BATCH_HEADER: "1", lp.STORED_HEADER: "1"})
    assert isinstance(lp.decode(await ws.receive_bytes(timeout=5)), lp.Welcome)
    code, sent, _ = await a.call("POST", "/v1/cf/async", json_body={"input": 1, "webhook": HOOK})
    assert code == 200, sent
    rid = sent["id"]
    await ws.send_bytes(lp.encode(lp.Credit(n=1)))
    got: list[lp.Frame] = []
    while not any(isinstance(f, lp.Dispatch) for f in got):
        got += lp.decode_all(await ws.receive_bytes(timeout=10))
    await ws.send_bytes(lp.encode(lp.Metric(rid, "executing")))  # frame 2, after the credit
    upto = max((f.upto for f in got if isinstance(f, lp.Stored)), default=0)
    while upto < 2:
        for f in lp.decode_all(await ws.receive_bytes(timeout=10)):
            if isinstance(f, lp.Stored):
                upto = f.upto
    # confirmed: the other replica (its own reads of NATS) sees it started, at once
    assert await _status(a, "cf", rid) == "executing"
    await ws.close()
