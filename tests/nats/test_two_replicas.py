"""Two gateway replicas on one NATS: whatever a client or worker does through one
replica is seen through the other."""

from __future__ import annotations

import asyncio
import base64

import aiohttp
import pytest

from spirit_gpu.supervisor.jobs import metric
from spirit_gpu.supervisor.transports.link import LinkTransport
from tests.conftest import until
from tests.gateway.conftest import AUTH, GatewayFactory, Gw, PlainWorker

pytestmark = pytest.mark.parametrize("store", ["nats"], indirect=True)
HOOK = "http://127.0.0.1:9/h"


async def two(gateway_factory: GatewayFactory, **kw: object) -> tuple[Gw, Gw]:
    return await gateway_factory(**kw), await gateway_factory(**kw)


async def test_sync_submitted_to_a_is_answered_by_a_worker_on_b(
        gateway_factory: GatewayFactory) -> None:
    a, b = await two(gateway_factory)
    worker = PlainWorker(b, "x")
    task = asyncio.create_task(worker.serve_echo())
    try:
        await until(lambda: _present(a, "x"), 5, "worker seen by replica a")
        codes = await asyncio.gather(*(a.call("POST", "/v1/x/sync", json_body={"input": i})
                                       for i in range(20)))
        assert [(c, body) for c, body, _ in codes] == [(200, {"echo": i}) for i in range(20)]
        large = "z" * (6 * 1024 * 1024)  # body and result past NATS' 1 MB message limit
        code, body, _ = await a.call("POST", "/v1/x/sync", json_body={"input": large})
        assert (code, body) == (200, {"echo": large})
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _present(gw: Gw, sid: str) -> bool:
    from spirit_gpu.gateway.service import GATEWAY_KEY
    return await gw.app[GATEWAY_KEY].storage.worker_count(sid) > 0


async def test_status_batch_queue_cancel_and_clean_from_either_replica(
        gateway_factory: GatewayFactory) -> None:
    a, b = await two(gateway_factory)
    ids = []
    for i in range(4):
        code, body, _ = await a.call("POST", "/v1/q/async", json_body={"input": i, "webhook": HOOK})
        assert code == 200
        ids.append((body["id"], body["sequence"]))
    for gw in (a, b):
        await until(lambda gw=gw: _queue_is(gw, "q", 4), 10, "four queued")
        code, body, _ = await gw.call("POST", "/v1/q/status",
                                      json_body={"requestIDs": [i for i, _ in ids]})
        assert code == 200 and [s["status"] for s in body["statuses"]] == ["queueing"] * 4
    code, _, _ = await b.call("DELETE", "/v1/q/async",
                              params={"requestID": ids[0][0], "sequence": str(ids[0][1])})
    assert code == 200
    assert (await a.status("q", ids[0][0]))["status"] == "cancelled"
    code, body, _ = await b.call("DELETE", "/v1/q/async")
    assert code == 200 and sorted(body["cleaned"]) == sorted(i for i, _ in ids[1:])
    await until(lambda: _queue_is(a, "q", 0), 10, "an empty queue")
    assert (await PlainWorker(a, "q").pull())[0] == 404  # nothing left to run


async def test_result_and_stream_through_the_other_replica(
        gateway_factory: GatewayFactory) -> None:
    a, b = await two(gateway_factory)
    _, sub, _ = await a.call("POST", "/v1/s/async", json_body={"input": 1, "webhook": HOOK})
    rid = sub["id"]
    worker = PlainWorker(b, "s")
    _, env = await worker.pull(wait_ms=2000)
    assert env is not None and env["headers"]["Ease-Request-Id"] == rid
    await worker.executing(rid)

    async def executing() -> bool:  # (written behind by replica b: a sees it shortly)
        return (await a.status("s", rid))["status"] == "executing"
    await until(executing, 5, "executing seen through replica a")
    events: list[bytes] = []

    async def read_sse() -> None:
        async with a.session.get(f"{a.url}/v1/s/stream", params={"requestID": rid},
                                 headers=AUTH) as resp:
            assert resp.status == 200
            async for line in resp.content:
                events.append(line)

    reader = asyncio.create_task(read_sse())
    for seq in range(3):
        code, _ = await worker.post(f"request-chunk/{rid}", data=f"part{seq}".encode(),
                                    headers={"Spirit-Chunk-Seq": str(seq)})
        assert code == 200
    big = b"y" * (2 * 1024 * 1024 - 10)  # past NATS' 1 MB message: via the object store
    assert (await worker.result(rid, 200, big))[0] == 200
    await asyncio.wait_for(reader, 10)
    text = b"".join(events).decode()
    assert "data: part0" in text and "data: part2" in text and "event: end" in text
    st = await a.status("s", rid)
    assert st["status"] == "succeed" and base64.b64decode(st["result"]) == big


async def test_cancel_running_is_pushed_to_the_link_on_the_other_replica(
        gateway_factory: GatewayFactory) -> None:
    a, b = await two(gateway_factory)
    async with aiohttp.ClientSession() as session:
        link = LinkTransport(session, f"{b.url}/agent/lc")
        await link.connect()
        _, sub, _ = await a.call("POST", "/v1/lc/async", json_body={"input": 1, "webhook": HOOK})
        rid = sub["id"]
        jobs = []
        while not jobs:
            jobs = (await link.pull(1)).jobs
        job = jobs[0]
        job.started_at = job.received_at
        await link.metric(job, metric(job, "executing"))
        assert (await a.call("DELETE", "/v1/lc/async", params={"requestID": rid}))[0] == 200

        async def told() -> list[str]:
            return (await link.heartbeat([rid])).cancel
        assert await until(told, 5, "cancel through replica b") == [rid]
        await link.result(job, 499, "cancelled", b"")
        st = await b.status("lc", rid)
        assert (st["status"], st["statusCode"]) == ("cancelled", 499)
        await link.close()


async def test_a_retried_publish_is_not_queued_twice(gateway_factory: GatewayFactory) -> None:
    """The job message carries Nats-Msg-Id = request id: publishing it again is a no-op."""
    from spirit_gpu.gateway.service import GATEWAY_KEY
    from spirit_gpu.gateway.storage.nats import NatsStorage, names
    a = await gateway_factory()
    _, sub, _ = await a.call("POST", "/v1/d/async", json_body={"input": 1, "webhook": HOOK})
    storage = a.app[GATEWAY_KEY].storage
    assert isinstance(storage, NatsStorage)
    again = await storage.js.publish(names.jobs("d"), b"again",
                                     headers={"Nats-Msg-Id": sub["id"]})
    assert again.duplicate
    await until(lambda: _queue_is(a, "d", 1), 10, "one queued")
    assert sub["sequence"] == again.seq  # the first publish's place in the stream


async def _queue_is(gw: Gw, sid: str, n: int) -> bool:
    """(the consumer's pending count follows a publish or removal a moment later)"""
    code, body, _ = await gw.call("GET", f"/v1/{sid}/status")
    return code == 200 and body == {"queueingCount": n}
