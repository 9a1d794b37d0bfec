"""The gateway's webhook relay while NATS is away answers 503 (a worker tries a 503
again), not a final 500: the client's webhook is delivered once NATS is back."""

from __future__ import annotations

from tests.conftest import until
from tests.gateway.conftest import GatewayFactory, PlainWorker, Webhooks
from tests.nats_server import TempNats


async def test_the_relay_asks_to_be_tried_again_while_the_store_is_away(
        gateway_factory: GatewayFactory, webhooks: Webhooks) -> None:
    nats = TempNats()
    try:
        gw = await gateway_factory(store=nats.url)
        code, sub, _ = await gw.call("POST", "/v1/r/async",
                                     json_body={"input": 1, "webhook": webhooks.url})
        assert code == 200, sub
        worker = PlainWorker(gw, "r")
        _, env = await worker.pull(wait_ms=5000)
        assert env is not None
        rid = env["headers"]["Ease-Request-Id"]
        assert (await worker.result(rid, 200, b'{"ok": true}'))[0] == 200
        relay = f"{gw.url}/agent/r/apis/v1/webhook/{rid}?statusCode=200"

        nats.server.kill()
        async with gw.session.post(relay, data=b'{"ok": true}') as resp:
            assert resp.status == 503, await resp.text()
            assert "try again" in (await resp.json())["error"]
        nats.server.start()

        async def relayed() -> bool:
            async with gw.session.post(relay, data=b'{"ok": true}') as resp:
                return resp.status == 200
        await until(relayed, 30, "the relay answering again")
        (query, body), = await webhooks.wait(1)
        assert (query["requestID"], body) == (rid, b'{"ok": true}')
    finally:
        nats.close()
