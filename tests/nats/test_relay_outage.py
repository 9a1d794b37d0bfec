"""A worker's webhook call while NATS is away. Through a replica that must read the
request from the store, the relay answers 503 (a worker tries a 503 again), not
a final 500: the client's webhook is delivered once NATS is back. The replica
that stored the worker's result relays it from memory, store or not."""

from __future__ import annotations

from tests.conftest import until
from tests.gateway.conftest import GatewayFactory, Gw, PlainWorker, Webhooks
from tests.nats_server import TempNats


async def ended(gw: Gw, webhooks: Webhooks) -> str:
    """A request with a webhook, its result stored through ``gw``: its id."""
    code, sub, _ = await gw.call("POST", "/v1/r/async",
                                 json_body={"input": 1, "webhook": webhooks.url})
    assert code == 200, sub
    worker = PlainWorker(gw, "r")
    _, env = await worker.pull(wait_ms=5000)
    assert env is not None
    rid: str = env["headers"]["Ease-Request-Id"]
    assert (await worker.result(rid, 200, b'{"ok": true}'))[0] == 200
    return rid


def relay_url(gw: Gw, rid: str) -> str:
    return f"{gw.url}/agent/r/apis/v1/webhook/{rid}?statusCode=200"


async def test_the_relay_asks_to_be_tried_again_while_the_store_is_away(
        gateway_factory: GatewayFactory, webhooks: Webhooks) -> None:
    nats = TempNats()
    try:
        gw = await gateway_factory(store=nats.url)
        other = await gateway_factory(store=nats.url)
        rid = await ended(gw, webhooks)
        relay = relay_url(other, rid)

        nats.server.kill()
        async with other.session.post(relay, data=b'{"ok": true}') as resp:
            assert resp.status == 503, await resp.text()
            assert "try again" in (await resp.json())["error"]
        nats.server.start()

        async def relayed() -> bool:
            async with other.session.post(relay, data=b'{"ok": true}') as resp:
                return resp.status == 200
        await until(relayed, 30, "the relay answering again")
        (query, body), = await webhooks.wait(1)
        assert (query["requestID"], body) == (rid, b'{"ok": true}')
    finally:
        nats.close()


async def test_the_replica_that_stored_the_result_relays_it_while_the_store_is_away(
        gateway_factory: GatewayFactory, webhooks: Webhooks) -> None:
    nats = TempNats()
    try:
        gw = await gateway_factory(store=nats.url)
        rid = await ended(gw, webhooks)
        nats.server.kill()
        async with gw.session.post(relay_url(gw, rid), data=b'{"ok": true}') as resp:
            assert resp.status == 200, await resp.text()
        (query, body), = await webhooks.wait(1)
        assert (query["requestID"], body) == (rid, b'{"ok": true}')
    finally:
        nats.close()
