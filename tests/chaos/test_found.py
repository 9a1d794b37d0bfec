"""Bugs the chaos suite found, each reproduced on its own, deterministically.

Each was marked ``xfail(strict=True)`` until fixed; these now guard the fixes.
"""

from __future__ import annotations

import asyncio

from tests.chaos.receiver import Receiver
from tests.conftest import until
from tests.gateway.conftest import (
    TOKEN,
    GatewayFactory,
    PlainWorker,
    gateway_factory,  # noqa: F401 - a fixture
)


async def test_a_worker_retrying_its_webhook_call_gets_it_delivered_once(
        gateway_factory: GatewayFactory) -> None:  # noqa: F811 - the fixture
    gw = await gateway_factory(worker_token=TOKEN)
    receiver = Receiver()
    await receiver.start()
    try:
        worker = PlainWorker(gw, "relay", token=TOKEN, worker_id="w1")
        code, accepted, _ = await gw.call("POST", "/v1/relay/async", json_body={
            "input": {"x": 1}, "webhook": receiver.webhook("flaky")})
        assert code == 200, accepted
        _, job = await worker.pull(wait_ms=5000)
        assert job is not None
        rid = job["headers"]["Ease-Request-Id"]
        await worker.executing(rid)
        assert (await worker.result(rid, 200, b'{"y": 2}'))[0] == 200
        relay, query = f"{worker.base}/webhook/{rid}", {"requestID": rid, "statusCode": "200"}

        async def call_relay() -> int:
            async with gw.session.post(relay, params=query, data=b'{"y": 2}') as resp:
                await resp.read()
                return resp.status
        # the worker's first call: the client's webhook answers it 500, the relay waits to retry
        first = asyncio.ensure_future(call_relay())
        await until(lambda: receiver.attempts[rid] >= 1, 10, "the relay's first attempt")
        # meanwhile the worker's own timeout ran out: it calls again (both calls end here)
        assert await call_relay() == 200
        assert await first == 200
        assert [d.status_code for d in receiver.delivered[rid]] == [200]
    finally:
        await receiver.stop()
