"""Client -> gateway proxy route -> worker listener -> fake LLM, all real HTTP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from yarl import URL

from tests.conftest import until
from tests.proxy.conftest import AUTH, BOTH_STORES, KEY, SID, Gateway, Worker
from tests.proxy.fake_llm import FakeLLM

MakeGateway = Callable[..., Awaitable[Gateway]]
MakeWorker = Callable[..., Awaitable[Worker]]


@pytest.fixture(params=["auto", "plain"], ids=["link", "http"])
def worker_transport(request: pytest.FixtureRequest) -> str:
    """Every test here runs over the proxy link and over HTTP to the listener."""
    return str(request.param)


async def ready_pair(llm: FakeLLM, make_gateway: MakeGateway, make_worker: MakeWorker,
                     workers: int = 1, **gw: Any) -> Gateway:
    gateway = await make_gateway(**gw)
    made = [await make_worker(llm.url, gateway.agent_url(),
                              worker_token=gateway.config.worker_token) for _ in range(workers)]
    await until(lambda: len(gateway.ready_workers()) == workers, what="workers ready")
    linked = workers if made[0].cfg.transport != "plain" else 0
    await until(lambda: gateway.linked() == linked, what=f"{linked} proxy links")
    return gateway


@BOTH_STORES
@pytest.mark.parametrize("path,body,marker", [
    ("/api/generate", {"model": "llama3.2", "prompt": "hi", "chunks": 4}, b'"done": true'),
    ("/api/chat", {"model": "llama3.2", "messages": [], "chunks": 4}, b'"done": true'),
    ("/v1/chat/completions", {"model": "m", "stream": True, "chunks": 4}, b"data: [DONE]"),
])
async def test_streams_reach_the_client_chunk_by_chunk(
        llm: FakeLLM, make_gateway: MakeGateway, make_worker: MakeWorker,
        path: str, body: dict[str, Any], marker: bytes) -> None:
    gateway = await ready_pair(llm, make_gateway, make_worker)
    gate = llm.gate(path)
    headers = {**AUTH, "X-Gate": path, "X-Tag": path}
    async with aiohttp.ClientSession() as s:
        async with s.post(gateway.url + path, json=body, headers=headers) as r:
            assert r.status == 200
            assert r.headers["Spirit-Request-Id"]
            first = await r.content.readline()
            # the first chunk is here while the fake has not written the last one
            assert first and path not in llm.finished
            assert llm.written[path] < 5
            gate.set()
            rest = await r.read()
    text = first + rest
    assert marker in text
    assert path in llm.finished
    if path.startswith("/api/"):
        lines = [json.loads(line) for line in text.splitlines()]
        assert len(lines) == 5 and lines[-1]["done"] is True
        assert r.headers["Content-Type"].startswith("application/x-ndjson")
    else:
        assert text.count(b"data: ") == 5
        assert r.headers["Content-Type"].startswith("text/event-stream")


@BOTH_STORES
async def test_a_head_sent_before_any_data_reaches_the_client_at_once(
        llm: FakeLLM, make_gateway: MakeGateway, make_worker: MakeWorker) -> None:
    gateway = await ready_pair(llm, make_gateway, make_worker)
    async with aiohttp.ClientSession() as s:
        async with asyncio.timeout(5):
            r = await s.post(gateway.url + "/api/generate", json={"chunks": 2},
                             headers={**AUTH, "X-Gate-First": "first", "X-Tag": "early"})
        assert r.status == 200 and llm.written["early"] == 0  # the head, before any chunk
        llm.gate("first").set()
        assert (await r.read()).count(b"\n") == 3


@BOTH_STORES
async def test_models_and_non_streaming_answers(llm: FakeLLM, make_gateway: MakeGateway,
                                                make_worker: MakeWorker) -> None:
    gateway = await ready_pair(llm, make_gateway, make_worker)
    async with aiohttp.ClientSession() as s:
        async with s.get(gateway.url + "/v1/models", headers=AUTH) as r:
            assert r.status == 200
            assert (await r.json())["data"][0]["id"] == "llama3.2"
        async with s.post(gateway.url + "/api/generate", headers=AUTH,
                          json={"stream": False, "chunks": 3}) as r:
            assert r.status == 200 and (await r.json())["done"] is True
        async with s.post(gateway.url + "/v1/chat/completions", headers=AUTH,
                          json={"stream": False}) as r:
            assert (await r.json())["object"] == "chat.completion"


@BOTH_STORES
async def test_headers_query_and_body_pass_but_auth_does_not(
        llm: FakeLLM, make_gateway: MakeGateway, make_worker: MakeWorker) -> None:
    gateway = await ready_pair(llm, make_gateway, make_worker, worker_token="wt")
    big = b"x" * (1024 * 1024 + 7)  # larger than the read-at-once size: streamed

    async def chunks() -> Any:
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    async with aiohttp.ClientSession() as s:
        async with s.post(URL(gateway.url + "/v1/echo/a%20b?x=1&y=%2F", encoded=True),
                          data=chunks(),
                          headers={**AUTH, "Authorization": "Bearer sk-user",
                                   "X-Custom": "v", "Connection": "keep-alive, X-Hop",
                                   "X-Hop": "gone"}) as r:
            assert r.status == 200
            echo = await r.json()
    upstream = {k.lower(): v for k, v in echo["headers"].items()}
    assert echo["raw_path"] == "/v1/echo/a%20b?x=1&y=%2F"  # exactly as the client wrote it
    assert echo["body_len"] == len(big)
    assert "auth" not in upstream
    assert "spirit-worker-token" not in upstream and "spirit-request-id" not in upstream
    assert "x-hop" not in upstream
    assert upstream["authorization"] == "Bearer sk-user"  # the LLM server's own auth passes
    assert upstream["x-custom"] == "v"
    assert "wt" not in json.dumps(echo)


# memory only: refused before the store or the registry is asked
@pytest.mark.parametrize("auth", ["", "sid1", "sid1-", "-k1", "sid1-wrong", "sid1k1",
                                  "other-wrong"])
async def test_bad_auth_is_401_and_never_forwarded(
        llm: FakeLLM, make_gateway: MakeGateway, make_worker: MakeWorker, auth: str) -> None:
    gateway = await ready_pair(llm, make_gateway, make_worker)
    async with aiohttp.ClientSession() as s:
        for path in ("/api/generate", "/v1/chat/completions", "/v1/models"):
            async with s.post(gateway.url + path, json={}, headers={"Auth": auth}) as r:
                assert r.status == 401
                assert "error" in await r.json()
                assert r.headers["Spirit-Request-Id"]  # the gateway's refusals carry one too
        huge = {**AUTH, "Content-Length": str(gateway.config.max_body_bytes + 1)}
        async with s.post(gateway.url + "/api/generate", data=b"", headers=huge,
                          skip_auto_headers=["Content-Length"]) as r:
            assert r.status == 400 and r.headers["Spirit-Request-Id"]
            limit = gateway.config.max_body_bytes
            assert (await r.json())["error"] == \
                f"request body too large: the limit is {limit} bytes"  # as docs/protocol.md
    assert llm.seen == []


@BOTH_STORES
async def test_without_auth_the_public_api_answers(
        llm: FakeLLM, make_gateway: MakeGateway, make_worker: MakeWorker) -> None:
    gateway = await ready_pair(llm, make_gateway, make_worker)
    async with aiohttp.ClientSession() as s:
        async with s.get(gateway.url + f"/v1/{SID}/status",
                         headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert (await r.json()) == {"queueingCount": 0}
        async with s.post(gateway.url + f"/v1/{SID}/sync", json={"input": 1}) as r:
            assert r.status == 401  # the public API's own check (a bearer key)
        async with s.post(gateway.url + "/api/generate", json={}) as r:
            assert r.status == 404  # no Auth: not a proxy request
    assert llm.seen == []


@BOTH_STORES
async def test_no_ready_worker_is_503(llm: FakeLLM, make_gateway: MakeGateway,
                                      make_worker: MakeWorker) -> None:
    gateway = await make_gateway()
    async with aiohttp.ClientSession() as s:
        async with s.post(gateway.url + "/api/generate", json={}, headers=AUTH) as r:
            assert r.status == 503
            assert await r.json() == {"error": "not enough gpu now"}
        # another serverless id's worker does not serve this one
        await make_worker(llm.url, gateway.agent_url("other"))
        await until(lambda: len(gateway.ready_workers("other")) == 1)
        async with s.post(gateway.url + "/api/generate", json={}, headers=AUTH) as r:
            assert r.status == 503


@BOTH_STORES
async def test_readiness_gates_traffic(llm: FakeLLM, make_gateway: MakeGateway,
                                       make_worker: MakeWorker) -> None:
    gateway = await make_gateway()
    allowed = asyncio.Event()
    calls = 0

    async def check_start() -> tuple[bool, str]:
        nonlocal calls
        calls += 1
        if calls == 2:
            return False, "RuntimeError('model still loading')"
        return allowed.is_set(), ""

    await make_worker(llm.url, gateway.agent_url(), check_start=check_start)
    await until(lambda: len(gateway.router.registry.workers(SID)) == 1 and calls >= 3,
                what="registered, not ready")
    assert gateway.ready_workers() == []
    async with aiohttp.ClientSession() as s:
        async with s.post(gateway.url + "/api/generate", json={}, headers=AUTH) as r:
            assert r.status == 503
        assert llm.seen == []
        allowed.set()
        await until(lambda: len(gateway.ready_workers()) == 1, what="ready")
        async with s.post(gateway.url + "/api/generate", json={"chunks": 2},
                          headers=AUTH) as r:
            assert r.status == 200 and b'"done": true' in await r.read()


@BOTH_STORES
async def test_response_start_timeout_is_408(llm: FakeLLM, make_gateway: MakeGateway,
                                             make_worker: MakeWorker) -> None:
    gateway = await ready_pair(llm, make_gateway, make_worker, proxy_response_timeout=0.3)
    async with aiohttp.ClientSession() as s:
        async with s.post(gateway.url + "/v1/slow-head", headers={**AUTH, "X-Tag": "slow"},
                          json={}) as r:
            assert r.status == 408
            error = (await r.json())["error"]  # on /v1/*: OpenAI's error shape
            assert "timeout" in error["message"] and error["type"] == "timeout"
    await until(lambda: "slow" in llm.aborted, what="upstream aborted after 408")
    assert len(gateway.ready_workers()) == 1  # a slow worker is not a broken one


@BOTH_STORES
async def test_a_client_gone_before_the_answer_begins_aborts_the_llm_request(
        llm: FakeLLM, make_gateway: MakeGateway, make_worker: MakeWorker) -> None:
    # a whole non-streamed generation (or a long wait for the first token) happens
    # before the answer's head: the client leaving then must free the GPU at once, not
    # when the 3-minute response limit passes
    gateway = await ready_pair(llm, make_gateway, make_worker)
    async with aiohttp.ClientSession() as s:
        with pytest.raises(TimeoutError):
            async with s.post(gateway.url + "/v1/slow-head", headers={**AUTH, "X-Tag": "left"},
                              json={}, timeout=aiohttp.ClientTimeout(total=0.5)) as r:
                await r.read()
    await until(lambda: "left" in llm.aborted, 10, what="the LLM request aborted")
    assert "left" not in llm.finished and len(gateway.ready_workers()) == 1
    async with aiohttp.ClientSession() as s:  # the worker serves the next one
        async with s.post(gateway.url + "/api/generate", json={"chunks": 2},
                          headers=AUTH) as r:
            assert r.status == 200 and b'"done": true' in await r.read()


@BOTH_STORES
async def test_transfer_limit_cuts_the_stream(llm: FakeLLM, make_gateway: MakeGateway,
                                              make_worker: MakeWorker) -> None:
    gateway = await ready_pair(llm, make_gateway, make_worker, proxy_transfer_timeout=0.4)
    got = b""
    async with aiohttp.ClientSession() as s:
        async with s.post(gateway.url + "/api/generate", headers={**AUTH, "X-Tag": "long"},
                          json={"chunks": 1000, "delay": 0.02}) as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                async for chunk in r.content.iter_any():
                    got += chunk
    assert got.count(b"\n") >= 2  # chunks arrived before the cut
    await until(lambda: "long" in llm.aborted, what="upstream aborted after the cut")
    assert "long" not in llm.finished
    assert len(gateway.ready_workers()) == 1
    async with aiohttp.ClientSession() as s:
        async with s.get(gateway.url + "/v1/models", headers=AUTH) as r:
            assert r.status == 200
        async with s.get(gateway.url + "/metrics") as r:
            metrics = await r.text()
    assert 'spirit_gateway_proxy_requests_total{code="cut_transfer_limit",sid="sid1"} 1.0' \
        in metrics
    assert 'spirit_gateway_proxy_requests_total{code="200",sid="sid1"} 1.0' in metrics
    assert 'spirit_gateway_proxy_in_flight{sid="sid1"} 0.0' in metrics
    assert 'spirit_gateway_proxy_response_start_seconds_count{sid="sid1"} 2.0' in metrics


@BOTH_STORES
@pytest.mark.parametrize("cancellation", [False, True])
async def test_client_disconnect_aborts_upstream(
        llm: FakeLLM, make_gateway: MakeGateway, make_worker: MakeWorker,
        cancellation: bool) -> None:
    gateway = await ready_pair(llm, make_gateway, make_worker,
                               handler_cancellation=cancellation)
    async with aiohttp.ClientSession() as s:
        r = await s.post(gateway.url + "/api/chat", headers={**AUTH, "X-Tag": "gone"},
                         json={"chunks": 1000, "delay": 0.02})
        assert r.status == 200
        assert await r.content.readline()
        r.close()  # the client goes away mid-stream
    await until(lambda: "gone" in llm.aborted, what="upstream aborted")
    assert llm.written["gone"] < 1000
    assert len(gateway.ready_workers()) == 1


@BOTH_STORES
async def test_two_workers_share_load(llm: FakeLLM, make_gateway: MakeGateway,
                                      make_worker: MakeWorker) -> None:
    gateway = await ready_pair(llm, make_gateway, make_worker, workers=2)
    registry = gateway.router.registry
    gate = llm.gate("hold")
    async with aiohttp.ClientSession() as s:
        # two held streams: least in-flight puts one on each worker
        held = [await s.post(gateway.url + "/api/generate", json={"chunks": 2},
                             headers={**AUTH, "X-Gate": "hold"}) for _ in range(2)]
        assert sorted(w.inflight for w in registry.workers(SID)) == [1, 1]
        gate.set()
        for r in held:
            assert b'"done": true' in await r.read()
        # sequential requests alternate
        statuses = []
        for _ in range(10):
            async with s.get(gateway.url + "/v1/models", headers=AUTH) as r:
                statuses.append(r.status)
        assert statuses == [200] * 10
    served = [w for w in registry._by_sid[SID].values()]
    assert len(served) == 2


@BOTH_STORES
async def test_worker_token_is_required_for_registration(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(worker_token="wt")
    body = {"workerID": "w1", "url": "http://127.0.0.1:1", "ready": True}
    url = gateway.agent_url() + "/apis/v1/proxy/register"
    async with aiohttp.ClientSession() as s:
        for headers in ({}, {"Authorization": "Bearer nope"}):
            async with s.post(url, json=body, headers=headers) as r:
                assert r.status == 401
        async with s.post(url, json=body, headers={"Authorization": "Bearer wt"}) as r:
            assert r.status == 200
            assert "proxy" in r.headers["Spirit-Agent-Features"]
            assert (await r.json())["leaseSeconds"] == gateway.config.lease_seconds
        async with s.post(url, json={"workerID": "w1"},
                          headers={"Authorization": "Bearer wt"}) as r:
            assert r.status == 400


@BOTH_STORES
async def test_listener_refuses_requests_without_the_worker_token(
        llm: FakeLLM, make_gateway: MakeGateway, make_worker: MakeWorker) -> None:
    gateway = await ready_pair(llm, make_gateway, make_worker, worker_token="wt")
    listener_url = gateway.ready_workers()[0].url
    async with aiohttp.ClientSession() as s:
        async with s.get(listener_url + "/v1/models") as r:
            assert r.status == 401
        async with s.get(listener_url + "/v1/models",
                         headers={"Spirit-Worker-Token": "wt"}) as r:
            assert r.status == 200
    assert len(llm.seen) == 1


@BOTH_STORES
async def test_silent_worker_leaves_with_its_lease(llm: FakeLLM,
                                                   make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(lease_seconds=0.3)
    url = gateway.agent_url() + "/apis/v1/proxy/register"
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json={"workerID": "w1", "url": llm.url, "ready": True}) as r:
            assert r.status == 200
        async with s.get(gateway.url + "/v1/models", headers=AUTH) as r:
            assert r.status == 200  # routed (straight to the fake: it is a valid upstream)
        await until(lambda: gateway.ready_workers() == [], what="lease expiry")
        async with s.get(gateway.url + "/v1/models", headers=AUTH) as r:
            assert r.status == 503


@BOTH_STORES
async def test_stopping_worker_deregisters(llm: FakeLLM, make_gateway: MakeGateway,
                                           make_worker: MakeWorker) -> None:
    gateway = await make_gateway()
    worker = await make_worker(llm.url, gateway.agent_url())
    await until(lambda: len(gateway.ready_workers()) == 1)
    async with aiohttp.ClientSession() as s:
        r = await s.post(gateway.url + "/api/generate", json={"chunks": 3},
                         headers={**AUTH, "X-Gate": "drain"})
        stopping = asyncio.create_task(worker.finish())
        await until(lambda: gateway.router.registry.workers(SID) == [], what="deregistered")
        assert not stopping.done()  # waiting for the in-flight stream
        llm.gate("drain").set()
        assert b'"done": true' in await r.read()  # the stream finished
        assert await stopping == 0
        async with s.post(gateway.url + "/api/generate", json={}, headers=AUTH) as r2:
            assert r2.status == 503


@BOTH_STORES
async def test_agent_answers_announce_proxy(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway()
    async with aiohttp.ClientSession() as s:
        async with s.get(gateway.agent_url() + "/apis/v1/proxy/workers") as r:
            assert r.status == 200 and "proxy" in r.headers["Spirit-Agent-Features"]
            assert await r.json() == {"workers": []}
        async with s.post(gateway.agent_url() + "/apis/v1/heartbeat", json={}) as r:
            assert r.status == 200
            features = r.headers["Spirit-Agent-Features"].split(",")
            assert "proxy" in features and "link" in features
        async with s.get(gateway.url + f"/v1/{SID}/status") as r:
            assert "Spirit-Agent-Features" not in r.headers


# memory only: the public API's own 404 and 405 (no store in them)
async def test_without_auth_404_and_405_are_unchanged(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway()
    async with aiohttp.ClientSession() as s:
        for method, path, status in (("PUT", f"/v1/{SID}/sync", 405),
                                     ("POST", "/v1/chat/completions", 404),
                                     ("GET", "/api/tags", 404), ("GET", "/nowhere", 404)):
            async with s.request(method, gateway.url + path) as r:
                assert r.status == status, (method, path)
                assert "error" in await r.json()
                if status == 405:
                    assert "POST" in r.headers["Allow"]


@BOTH_STORES
async def test_cookies_reach_their_own_client_only(
        llm: FakeLLM, make_gateway: MakeGateway, make_worker: MakeWorker) -> None:
    gateway = await make_gateway()
    # a host name, as in the README's ollama example (aiohttp keeps no cookies for IPs)
    await make_worker(llm.url.replace("127.0.0.1", "localhost"), gateway.agent_url())
    await until(lambda: len(gateway.ready_workers()) == 1)
    async with aiohttp.ClientSession() as alice:
        async with alice.get(gateway.url + "/v1/echo/login?set_cookie=alice", headers=AUTH) as r:
            assert r.cookies["session"].value == "alice"
    async with aiohttp.ClientSession() as bob:
        async with bob.get(gateway.url + "/v1/echo/who", headers=AUTH) as r:
            echo = await r.json()
    assert "cookie" not in {k.lower() for k in echo["headers"]}


@BOTH_STORES
async def test_expect_100_continue(llm: FakeLLM, make_gateway: MakeGateway,
                                   make_worker: MakeWorker) -> None:
    gateway = await ready_pair(llm, make_gateway, make_worker)
    listener = gateway.ready_workers()[0].url
    body = b"y" * 300_000
    async with aiohttp.ClientSession() as s:
        for url, headers in ((gateway.url, AUTH), (listener, {})):
            async with asyncio.timeout(5):
                async with s.post(url + "/api/echo/upload", data=body, headers=headers,
                                  expect100=True) as r:
                    assert r.status == 200
                    echo = await r.json()
            assert echo["body_len"] == len(body)
            assert "expect" not in {k.lower() for k in echo["headers"]}


@BOTH_STORES
async def test_head_keeps_the_content_length(llm: FakeLLM, make_gateway: MakeGateway,
                                             make_worker: MakeWorker) -> None:
    gateway = await ready_pair(llm, make_gateway, make_worker)
    async with aiohttp.ClientSession() as s:
        async with s.get(gateway.url + "/v1/models", headers=AUTH) as r:
            length = len(await r.read())
        async with s.head(gateway.url + "/v1/models", headers=AUTH) as r:
            assert r.status == 200
            assert int(r.headers["Content-Length"]) == length
            assert await r.read() == b""
        async with s.get(gateway.url + "/v1/models", headers=AUTH) as r:
            assert r.status == 200  # the connection is still in good shape
