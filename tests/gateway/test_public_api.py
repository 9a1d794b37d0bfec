"""The public serverless API against a scripted plain-protocol worker."""

from __future__ import annotations

import asyncio
import base64
import json

import aiohttp

from spirit_gpu.gateway.public_api import never_connected
from tests.conftest import until
from tests.gateway.conftest import AUTH, BOTH_STORES, GatewayFactory, Gw, PlainWorker

pytestmark = BOTH_STORES


async def test_sync_round_trip_and_status(gw: Gw, echo_worker: PlainWorker) -> None:
    code, body, resp = await gw.call("POST", "/v1/echo/sync", json_body={"input": {"x": 1}})
    assert code == 200 and body == {"echo": {"x": 1}}
    assert resp.content_type == "application/json"


async def test_sync_without_worker_is_503(gw: Gw) -> None:
    code, body, _ = await gw.call("POST", "/v1/nobody/sync", json_body={"input": 1})
    assert code == 503 and body["error"].startswith("not enough gpu now")


async def test_auth_negatives(gw: Gw) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + "x"},
                    {"Authorization": "Bearer"}):
        for method, path in (("POST", "/v1/s/sync"), ("POST", "/v1/s/async"),
                             ("GET", "/v1/s/status"), ("POST", "/v1/s/status"),
                             ("DELETE", "/v1/s/async"), ("GET", "/v1/s/stream?requestID=x")):
            code, body, _ = await gw.call(method, path, json_body={"input": 1}, headers=headers)
            assert code == 401, (method, path, headers)
            assert "unauthorized" in body["error"]


async def test_a_key_that_is_not_utf8_is_401_not_500(gw: Gw) -> None:
    port = int(gw.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /v1/s/status HTTP/1.1\r\nHost: x\r\n"
                 b"Authorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401"), answer
    assert b"unauthorized" in body


async def test_bad_bodies_are_400(gw: Gw) -> None:
    cases = [
        (b"", "failed to get request data"),
        (b"{not json", "invalid request data"),
        (b'{"input": {"x": "\xff"}}', "invalid request data"),  # not UTF-8, inside input
        (b"[1, 2]", "invalid request arguments"),
        (b'{"x": 1}', "invalid request arguments"),
        (b'{"input": 1, "policy": {"ttl": "soon"}}', "invalid request arguments"),
        (b'{"input": 1, "policy": {"ttl": 0}}', "invalid request arguments"),
    ]
    for raw, error in cases:
        for mode in ("sync", "async"):
            code, body, _ = await gw.call("POST", f"/v1/s/{mode}", data=raw,
                                          headers={**AUTH, "Content-Type": "application/json"})
            assert code == 400 and body["error"].startswith(error), (mode, raw, body)
    code, body, _ = await gw.call("POST", "/v1/s/status", data=b"",
                                  headers={**AUTH, "Content-Type": "application/json"})
    assert (code, body) == (400, {"error": "failed to get request data: the body is empty"})
    code, body, _ = await gw.call("POST", "/v1/s/async", json_body={"input": 1})
    assert (code, body) == (400, {"error": "webhook is empty for async request"})
    code, body, _ = await gw.call("POST", "/v1/s/async",
                                  json_body={"input": 1, "webhook": "ftp://x/y"})
    assert code == 400 and "webhook" in body["error"]
    code, body, _ = await gw.call("POST", "/v1/s/async", json_body={
        "input": 1, "webhook": "http://127.0.0.1:9/h", "policy": {"ttl": 86_400_001}})
    assert code == 400 and "policy.ttl" in body["error"]
    code, body, _ = await gw.call("POST", "/v1/bad%20sid/sync", json_body={"input": 1})
    assert code == 400 and "serverless id" in body["error"]


async def test_unknown_routes_answer_json(gw: Gw) -> None:
    code, body, _ = await gw.call("GET", "/nope")
    assert code == 404 and body == {"error": "Not Found"}
    code, body, resp = await gw.call("PUT", "/v1/s/sync")
    assert code == 405 and "error" in body and "POST" in resp.headers["Allow"]


async def test_async_flow_status_and_batch(gw: Gw) -> None:
    hook = "http://127.0.0.1:9/hook"
    code, body, _ = await gw.call("POST", "/v1/a/async", json_body={"input": {"v": 1},
                                                                   "webhook": hook})
    assert code == 200 and set(body) == {"id", "sequence"}
    first = body
    code, second, _ = await gw.call("POST", "/v1/a/async", json_body={"input": 2,
                                                                     "webhook": hook})
    assert second["sequence"] == first["sequence"] + 1
    await until(lambda: _queue_is(gw, "a", 2), 10, "both requests counted as queued")
    st = await gw.status("a", first["id"])
    assert st == {"statusCode": 0, "serverlessID": "a", "requestID": first["id"],
                  "status": "queueing", "message": f"queued: {never_connected('a')}",
                  "result": None}

    worker = PlainWorker(gw, "a")
    _, env = await worker.pull(wait_ms=5000)
    assert env is not None
    h = env["headers"]
    assert h["Ease-Mode"] == "async" and h["Ease-Request-Id"] == first["id"]
    assert h["Ease-Webhook"] == hook and h["Ease-Time-To-Live"] == "900000"
    assert int(h["Ease-Enqueue-At"]) >= int(h["Ease-Create-At"]) > 0
    # the worker calls the gateway's webhook relay, which passes the first end on
    relay = f"{gw.url}/agent/a/apis/v1/webhook/{first['id']}"
    assert env["input"] == {"input": {"v": 1}, "webhook": relay}
    assert (await gw.status("a", first["id"]))["status"] == "executing"
    await worker.executing(first["id"])
    assert (await worker.result(first["id"], 200, b'{"ok": true}'))[0] == 200
    st = await gw.status("a", first["id"])
    assert st["status"] == "succeed" and st["statusCode"] == 200
    assert base64.b64decode(st["result"]) == b'{"ok": true}'

    code, body, _ = await gw.call("POST", "/v1/a/status",
                                  json_body={"requestIDs": [first["id"], second["id"], "zz"]})
    assert code == 200
    got = {s["requestID"]: s["status"] for s in body["statuses"]}
    assert got == {first["id"]: "succeed", second["id"]: "queueing", "zz": "notFound"}
    for bad in (b"{}", b'{"requestIDs": "x"}', b"nope"):
        code, body, _ = await gw.call("POST", "/v1/a/status", data=bad)
        assert code == 400, bad
    code, body, _ = await gw.call("GET", "/v1/a/status", params={"requestID": "zz"})
    assert code == 404 and "not found" in body["error"]


async def test_worker_status_code_and_bytes_come_back(gw: Gw) -> None:
    worker = PlainWorker(gw, "w")
    await worker.heartbeat([])  # seen: sync is accepted

    async def answer(code: int, data: bytes) -> None:
        _, env = await worker.pull(wait_ms=5000)
        assert env is not None
        await worker.result(env["headers"]["Ease-Request-Id"], code, data, "msg")

    for code, data, ctype in ((400, b'{"error": "bad input"}', "application/json"),
                              (200, b"\x89PNG\x00", "application/octet-stream"),
                              (500, b"", "application/json")):
        task = asyncio.create_task(answer(code, data))
        got, body, resp = await gw.call("POST", "/v1/w/sync", json_body={"input": 1})
        await task
        assert got == code and resp.content_type == ctype
        if ctype == "application/octet-stream":
            assert body == data
        elif data:
            assert body == json.loads(data)
        else:
            assert body == {"error": "msg"}


async def test_sync_timeout_is_408_and_cancels(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(sync_timeout=0.3)
    worker = PlainWorker(gw, "slow")
    await worker.heartbeat([])
    code, body, _ = await gw.call("POST", "/v1/slow/sync", json_body={"input": 1})
    assert code == 408 and body["error"].startswith("request timeout")
    # it timed out while queued: it is gone from the queue
    _, env = await worker.pull(wait_ms=5000)
    assert env is None  # it was cancelled while queued: nothing to hand out


async def test_async_ttl_expires_in_queue(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory()
    code, body, _ = await gw.call("POST", "/v1/t/async", json_body={
        "input": 1, "webhook": "http://127.0.0.1:9/h", "policy": {"ttl": 100}})
    assert code == 200

    async def expired() -> bool:
        return bool((await gw.status("t", body["id"]))["statusCode"] == 408)
    await until(expired, 5, "ttl expiry")
    st = await gw.status("t", body["id"])
    assert st["status"] == "failed" and "ttl" in st["message"]
    assert (await PlainWorker(gw, "t").pull())[0] == 404


async def test_results_kept_for_retention_then_404(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(result_retention=0.3)
    code, body, _ = await gw.call("POST", "/v1/r/async", json_body={
        "input": 1, "webhook": "http://127.0.0.1:9/h"})
    worker = PlainWorker(gw, "r")
    _, env = await worker.pull(wait_ms=5000)
    assert env is not None
    await worker.result(body["id"], 200, b"1")
    assert (await gw.status("r", body["id"]))["status"] == "succeed"

    async def gone() -> bool:
        code, _, _ = await gw.call("GET", "/v1/r/status", params={"requestID": body["id"]})
        return code == 404
    await until(gone, 5, "retention")


async def test_cancel_queued_one_and_clean_all(gw: Gw) -> None:
    hook = {"webhook": "http://127.0.0.1:9/h"}
    ids = []
    for i in range(3):
        _, body, _ = await gw.call("POST", "/v1/c/async", json_body={"input": i, **hook})
        ids.append(body)
    code, body, _ = await gw.call("DELETE", "/v1/c/async", params={
        "requestID": ids[0]["id"], "sequence": str(ids[0]["sequence"] + 5)})
    assert code == 400 and "sequence" in body["error"]
    code, body, _ = await gw.call("DELETE", "/v1/c/async", params={"sequence": "x",
                                                                  "requestID": ids[0]["id"]})
    assert code == 400
    code, body, _ = await gw.call("DELETE", "/v1/c/async", params={
        "requestID": ids[0]["id"], "sequence": str(ids[0]["sequence"])})
    assert (code, body) == (200, {"id": ids[0]["id"]})
    code, body, _ = await gw.call("DELETE", "/v1/c/async", params={"requestID": ids[0]["id"]})
    assert (code, body) == (200, {"id": ids[0]["id"]})  # cancelling twice is fine
    st = await gw.status("c", ids[0]["id"])
    assert (st["status"], st["statusCode"]) == ("cancelled", 499)
    code, body, _ = await gw.call("DELETE", "/v1/c/async", params={"requestID": "nope"})
    assert code == 404
    code, body, _ = await gw.call("DELETE", "/v1/c/async")
    assert code == 200 and body["id"] == "c"
    assert sorted(body["cleaned"]) == sorted([ids[1]["id"], ids[2]["id"]])
    await until(lambda: _queue_is(gw, "c", 0), 10, "an empty queue after the clean")
    assert (await PlainWorker(gw, "c").pull())[0] == 404


async def test_cancel_running_tells_the_worker(gw: Gw) -> None:
    _, body, _ = await gw.call("POST", "/v1/k/async", json_body={
        "input": 1, "webhook": "http://127.0.0.1:9/h"})
    worker = PlainWorker(gw, "k")
    _, env = await worker.pull(wait_ms=5000)
    assert env is not None
    await worker.executing(body["id"])
    assert await worker.heartbeat([body["id"]]) == []
    code, _, _ = await gw.call("DELETE", "/v1/k/async", params={"requestID": body["id"]})
    assert code == 200
    assert (await gw.status("k", body["id"]))["status"] == "cancelled"
    assert await worker.heartbeat([body["id"]]) == [body["id"]]
    code, _ = await worker.result(body["id"], 499, b'{"error": "cancelled"}')
    assert code == 200
    st = await gw.status("k", body["id"])
    assert (st["status"], st["statusCode"]) == ("cancelled", 499)
    code, body2, _ = await gw.call("DELETE", "/v1/k/async", params={"requestID": body["id"]})
    assert code == 200  # already cancelled


async def test_cancel_finished_is_400(gw: Gw, echo_worker: PlainWorker) -> None:
    _, body, _ = await gw.call("POST", "/v1/echo/async", json_body={
        "input": 1, "webhook": "http://127.0.0.1:9/h"})

    async def done() -> bool:
        return bool((await gw.status("echo", body["id"]))["status"] == "succeed")
    await until(done, 5, "echo finished")
    code, err, _ = await gw.call("DELETE", "/v1/echo/async", params={"requestID": body["id"]})
    assert code == 400 and "finished" in err["error"]


async def test_body_over_20_mb_rejected_while_streaming(gw: Gw) -> None:
    limit = gw.config.max_body_bytes
    assert limit == 20 * 1024 * 1024
    sent = 0

    async def body() -> object:  # chunked: no Content-Length to reject up front
        nonlocal sent
        yield b'{"input": "'
        sent += 11
        chunk = b"x" * (1024 * 1024)
        while sent < 200 * 1024 * 1024:
            yield chunk
            sent += len(chunk)
        yield b'"}'

    try:
        async with gw.session.post(gw.url + "/v1/s/sync", data=body(), headers=AUTH) as resp:
            assert resp.status == 400
            assert "body too large" in (await resp.json())["error"]
    except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
        pass  # the gateway may close before the client sees the answer
    assert sent < 100 * 1024 * 1024  # it stopped reading long before the end

    exact = b'{"input": "' + b"x" * (limit - 13) + b'"}'
    assert len(exact) == limit - 0
    code, body2, _ = await gw.call("POST", "/v1/s/async", data=exact + b" ")
    assert code == 400 and "body too large" in body2["error"]
    code, body2, _ = await gw.call("POST", "/v1/s/async", data=exact)
    assert code == 400 and body2["error"] == "webhook is empty for async request"


async def test_result_too_large(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(max_result_bytes_async=10)
    _, body, _ = await gw.call("POST", "/v1/big/async", json_body={
        "input": 1, "webhook": "http://127.0.0.1:9/h"})
    worker = PlainWorker(gw, "big")
    await worker.pull(wait_ms=5000)
    code, err = await worker.result(body["id"], 200, b"x" * 11)
    assert code == 413 and "result too large" in err["error"]
    st = await gw.status("big", body["id"])
    assert (st["status"], st["statusCode"]) == ("failed", 500)
    assert "result too large" in st["message"]


async def test_ops_endpoints(gw: Gw, echo_worker: PlainWorker) -> None:
    await gw.call("POST", "/v1/echo/sync", json_body={"input": 1})
    for path in ("/healthz", "/readyz"):
        code, body, _ = await gw.call("GET", path, headers={})
        assert code == 200 and body["status"] in ("ok", "ready")
    code, text, resp = await gw.call("GET", "/metrics", headers={})
    assert code == 200 and resp.content_type == "text/plain"
    text = text.decode() if isinstance(text, bytes) else str(text)
    for name in ('spirit_gateway_requests_accepted_total{mode="sync",sid="echo"} 1.0',
                 'spirit_gateway_requests_finished_total{mode="sync",sid="echo",'
                 'status="succeed"} 1.0',
                 'spirit_gateway_request_duration_seconds_count{mode="sync",sid="echo"} 1.0',
                 'spirit_gateway_queue_length{sid="echo"} 0.0',
                 'spirit_gateway_workers{sid="echo"} 1.0'):
        assert name in text, name
    code, doc, _ = await gw.call("GET", "/openapi.json", headers={})
    assert code == 200 and doc["openapi"].startswith("3.")
    assert "/v1/{sid}/sync" in doc["paths"]


async def _queue_is(gw: Gw, sid: str, n: int) -> bool:
    """(on NATS the consumer's pending count follows a publish or removal a moment later)"""
    code, body, _ = await gw.call("GET", f"/v1/{sid}/status")
    return code == 200 and body == {"queueingCount": n}
