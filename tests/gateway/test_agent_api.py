"""The agent API as a worker sees it: features, long-poll, auth, leases, chunks + SSE."""

from __future__ import annotations

import asyncio
import time

from spirit_gpu.gateway.service import GATEWAY_KEY
from tests.conftest import until
from tests.gateway.conftest import AUTH, BOTH_STORES, TOKEN, GatewayFactory, Gw, PlainWorker

pytestmark = BOTH_STORES

FEATURES = "Spirit-Agent-Features"


async def test_every_agent_answer_announces_features(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(worker_token=TOKEN)
    calls = [("GET", "request"), ("POST", "heartbeat"), ("POST", "request-ack/x"),
             ("POST", "request-metric/x"), ("POST", "request-result/x"),
             ("POST", "request-chunk/x"), ("GET", "link")]
    for token, expected in ((TOKEN, None), ("wrong", 401), ("", 401)):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        for method, path in calls:
            async with gw.session.request(method, f"{gw.agent('s')}/{path}",
                                          headers=headers) as resp:
                features = set(resp.headers[FEATURES].split(","))
                assert {"longpoll", "stream", "cancel", "link"} <= features, path
                if expected is not None:
                    assert resp.status == expected, (path, token)
                    assert "worker token" in (await resp.json())["error"]
                else:
                    assert resp.status != 401


async def test_long_poll_hands_over_within_milliseconds(gw: Gw) -> None:
    worker = PlainWorker(gw, "lp")
    started = time.monotonic()
    code, env = await worker.pull(wait_ms=50)
    assert code == 404 and time.monotonic() - started >= 0.045
    pulling = asyncio.create_task(worker.pull(wait_ms=10_000))

    async def waiting() -> bool:
        return await gw.app[GATEWAY_KEY].storage.worker_count("lp") > 0
    await until(waiting, 5, "worker waiting")
    submitted = time.monotonic()
    code, body, _ = await gw.call("POST", "/v1/lp/async", json_body={
        "input": 1, "webhook": "http://127.0.0.1:9/h"})
    code, env = await pulling
    assert env is not None and env["headers"]["Ease-Request-Id"] == body["id"]
    assert time.monotonic() - submitted < 0.5
    code, _ = await worker.pull(wait_ms=5000)
    assert code == 404


async def test_bad_agent_inputs(gw: Gw) -> None:
    worker = PlainWorker(gw, "b")
    async with gw.session.get(f"{worker.base}/request", params={"wait": "soon"}) as resp:
        assert resp.status == 400
    assert (await worker.post("request-result/x", data=b"{no"))[0] == 400
    assert (await worker.post("request-result/x", {"statusCode": 200, "data": "!!"}))[0] == 400
    assert (await worker.result("unknown", 200, b"x"))[0] == 404
    assert (await worker.post("request-metric/x", data=b"[]"))[0] == 400
    assert (await worker.post("heartbeat", data=b'{"requestIDs": 3}'))[0] == 400
    assert (await worker.post("heartbeat", data=b""))[0] == 200
    assert (await worker.post("request-chunk/x", data=b"1"))[0] == 400
    assert (await worker.post("request-chunk/x", data=b"1",
                              headers={"Spirit-Chunk-Seq": "0"}))[0] == 404
    assert (await worker.post("request-ack/x"))[0] == 200


async def test_worker_token_accepted(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(worker_token=TOKEN)
    _, body, _ = await gw.call("POST", "/v1/t/async", json_body={
        "input": 1, "webhook": "http://127.0.0.1:9/h"})
    assert (await PlainWorker(gw, "t").pull())[0] == 401
    code, env = await PlainWorker(gw, "t", token=TOKEN).pull(wait_ms=5000)
    assert code == 200 and env is not None
    code, _, _ = await gw.call("POST", "/v1/t/sync", json_body={"input": 1},
                               headers={"Authorization": f"Bearer {TOKEN}"})
    assert code == 401  # a worker token is not an API key


async def test_lease_redelivers_unstarted_and_fails_started(
        gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(lease_seconds=0.3)
    hook = "http://127.0.0.1:9/h"
    _, a, _ = await gw.call("POST", "/v1/l/async", json_body={"input": "a", "webhook": hook})
    _, b, _ = await gw.call("POST", "/v1/l/async", json_body={"input": "b", "webhook": hook})
    lost = PlainWorker(gw, "l", worker_id="lost")
    _, env_a = await lost.pull(wait_ms=5000)
    _, env_b = await lost.pull(wait_ms=5000)
    assert env_a and env_b
    await lost.executing(b["id"])  # b started, a never did; then the worker goes silent

    async def b_failed() -> bool:
        return bool((await gw.status("l", b["id"]))["status"] == "failed")
    await until(b_failed, 5, "lease expiry")
    st = await gw.status("l", b["id"])
    assert st["statusCode"] == 500 and "worker lost" in st["message"]
    assert (await gw.status("l", a["id"]))["status"] == "queueing"
    fresh = PlainWorker(gw, "l", worker_id="fresh")
    code, env = await fresh.pull(wait_ms=5000)
    assert env is not None and env["headers"]["Ease-Request-Id"] == a["id"]
    # the lost worker comes back and reports b: the first terminal status stays
    assert (await lost.result(b["id"], 200, b"late"))[0] == 200
    assert (await gw.status("l", b["id"]))["statusCode"] == 500
    assert await lost.heartbeat([b["id"]]) == [b["id"]]  # told to stop it


async def test_heartbeats_keep_a_long_job_alive(gateway_factory: GatewayFactory) -> None:
    # (a lease a loaded run's pull-to-start delay cannot exceed: a shorter one ran out
    # before the job's start, and the job was rightly queued again)
    gw = await gateway_factory(lease_seconds=1.0)
    _, a, _ = await gw.call("POST", "/v1/h/async", json_body={
        "input": 1, "webhook": "http://127.0.0.1:9/h"})
    worker = PlainWorker(gw, "h")
    await worker.pull(wait_ms=5000)
    await worker.executing(a["id"])
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:  # three leases long
        assert await worker.heartbeat([a["id"]]) == []
        assert (await gw.status("h", a["id"]))["status"] == "executing"
        await asyncio.sleep(0.2)
    await worker.result(a["id"], 200, b"1")
    assert (await gw.status("h", a["id"]))["status"] == "succeed"


async def test_unstarted_job_fails_after_max_deliveries(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(lease_seconds=0.2, max_deliveries=2)
    _, a, _ = await gw.call("POST", "/v1/m/async", json_body={
        "input": 1, "webhook": "http://127.0.0.1:9/h"})
    for i in range(2):
        worker = PlainWorker(gw, "m", worker_id=f"w{i}")

        async def pulled(w: PlainWorker = worker) -> bool:
            return (await w.pull(wait_ms=5000))[0] == 200
        await until(pulled, 5, f"delivery {i}")

    async def failed() -> bool:
        return bool((await gw.status("m", a["id"]))["status"] == "failed")
    await until(failed, 5, "failure after deliveries")
    assert "2 deliveries" in (await gw.status("m", a["id"]))["message"]


async def test_chunks_stream_as_sse_before_the_end(gw: Gw) -> None:
    worker = PlainWorker(gw, "sse")
    _, a, _ = await gw.call("POST", "/v1/sse/async", json_body={
        "input": 1, "webhook": "http://127.0.0.1:9/h"})
    await worker.pull(wait_ms=5000)
    await worker.executing(a["id"])
    seen: list[bytes] = []
    async with gw.session.get(f"{gw.url}/v1/sse/stream", params={"requestID": a["id"]},
                              headers=AUTH) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        for seq in range(3):
            item = b'{"i": %d}' % seq
            assert (await worker.post(f"request-chunk/{a['id']}", data=item,
                                      headers={"Spirit-Chunk-Seq": str(seq)}))[0] == 200
            event = await resp.content.readuntil(b"\n\n")
            assert event == b"id: %d\ndata: %s\n\n" % (seq, item)
            seen.append(event)
        # a duplicate seq is dropped
        await worker.post(f"request-chunk/{a['id']}", data=b"dup",
                          headers={"Spirit-Chunk-Seq": "1"})
        await worker.result(a["id"], 200, b"[]")
        end = await resp.content.readuntil(b"\n\n")
        assert end == b'event: end\ndata: {"statusCode":200,"status":"succeed"}\n\n'
        assert await resp.content.read() == b""
    # a late subscriber gets the whole story at once
    async with gw.session.get(f"{gw.url}/v1/sse/stream", params={"requestID": a["id"]},
                              headers=AUTH) as resp:
        text = await resp.read()
    assert text == b"".join(seen) + end
    code, _, _ = await gw.call("GET", "/v1/sse/stream", params={"requestID": "nope"})
    assert code == 404
    code, _, _ = await gw.call("GET", "/v1/sse/stream")
    assert code == 400
