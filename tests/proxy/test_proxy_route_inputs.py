"""The proxy route's answers to odd and hostile input, read by real clients.

Serverless ids and keys with '-', non-ASCII and non-UTF-8 headers, errors as
the official ``openai`` and ``ollama`` Python clients read them, and a proxy
link client that never reads.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
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


async def ready(gateway: Gateway, llm: FakeLLM, make_worker: MakeWorker, sid: str = SID,
                transport: str = "auto") -> None:
    await make_worker(llm.url, gateway.agent_url(sid), transport=transport,
                      worker_token=gateway.config.worker_token)
    await until(lambda: len(gateway.ready_workers(sid)) == 1, what="worker ready")
    if transport != "plain":
        await until(lambda: gateway.linked(sid) == 1, what="proxy link")


async def raw_exchange(url: str, head: bytes) -> bytes:
    """Send ``head`` (a request without a body) on a fresh connection; the whole answer."""
    u = URL(url)
    reader, writer = await asyncio.open_connection(u.host, u.port)
    try:
        writer.write(head)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()


# ---- Auth: serverless ids and keys that contain '-' -------------------------------------

@BOTH_STORES
@pytest.mark.parametrize(("sid", "keys", "auth"), [
    ("team-a-llama", ["k1"], "team-a-llama-k1"),  # an id with '-'
    ("sid1", ["sk-live-1"], "sid1-sk-live-1"),  # a key with '-'
    ("a-b", ["c", "x-c"], "a-b-x-c"),  # both: the longer key that fits wins
])
async def test_ids_and_keys_with_dashes_reach_their_worker(
        llm: FakeLLM, make_gateway: MakeGateway, make_worker: MakeWorker,
        sid: str, keys: list[str], auth: str) -> None:
    gateway = await make_gateway(api_keys=keys)
    await ready(gateway, llm, make_worker, sid)
    async with aiohttp.ClientSession() as s:
        async with s.get(gateway.url + "/v1/models", headers={"Auth": auth}) as r:
            assert r.status == 200, await r.text()
        async with s.get(gateway.url + "/v1/models", headers={"Auth": f"{sid}-nope"}) as r:
            assert r.status == 401
    assert len(llm.seen) == 1


# memory only: refused before the store or the registry is asked
@pytest.mark.parametrize("auth", ["s\u00efd1-k1".encode(), b"sid1-k\xff1", b"\xe2\x82\xac-k1",
                                  "sid1-k1\u00e9".encode()])
async def test_non_ascii_auth_is_401(make_gateway: MakeGateway, auth: bytes) -> None:
    gateway = await make_gateway()
    answer = await raw_exchange(gateway.url, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
                                             b"Auth: " + auth + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert b"invalid api key" in answer


# memory only: refused before the store or the registry is asked
async def test_an_invalid_serverless_id_with_a_good_key_is_401(
        make_gateway: MakeGateway) -> None:
    gateway = await make_gateway()
    async with aiohttp.ClientSession() as s:
        for sid in ("..", "x" * 3000, "a/b", "-a"):
            async with s.get(gateway.url + "/v1/models", headers={"Auth": f"{sid}-{KEY}"}) as r:
                assert r.status == 401, sid


# ---- errors as the official clients read them -------------------------------------------

@BOTH_STORES
async def test_openai_client_shows_the_gateways_message(
        llm: FakeLLM, make_gateway: MakeGateway, make_worker: MakeWorker) -> None:
    openai = pytest.importorskip("openai", reason="the openai client is in the test extra")
    gateway = await make_gateway()

    def client(auth: str) -> Any:
        return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="sk-user",
                                  default_headers={"Auth": auth}, max_retries=0)

    with pytest.raises(openai.AuthenticationError) as denied:
        await client(f"{SID}-wrong").models.list()
    assert denied.value.status_code == 401
    assert "invalid api key" in denied.value.message
    assert denied.value.code == "invalid_api_key"
    with pytest.raises(openai.InternalServerError) as no_worker:
        await client(f"{SID}-{KEY}").chat.completions.create(model="m", messages=[])
    assert no_worker.value.status_code == 503
    assert "not enough gpu now" in no_worker.value.message
    await ready(gateway, llm, make_worker)  # and through a worker, a real answer
    models = await client(f"{SID}-{KEY}").models.list()
    assert [m.id for m in models.data] == ["llama3.2"]


@BOTH_STORES
async def test_ollama_client_reads_the_error_text(make_gateway: MakeGateway) -> None:
    ollama = pytest.importorskip("ollama", reason="the ollama client is in the test extra")
    gateway = await make_gateway()
    client = ollama.AsyncClient(host=gateway.url, headers={"Auth": f"{SID}-wrong"})
    with pytest.raises(ollama.ResponseError) as denied:
        await client.generate(model="llama3.2", prompt="hi")
    assert denied.value.status_code == 401
    assert "invalid api key" in denied.value.error
    client = ollama.AsyncClient(host=gateway.url, headers={"Auth": f"{SID}-{KEY}"})
    with pytest.raises(ollama.ResponseError) as no_worker:
        await client.generate(model="llama3.2", prompt="hi")
    assert (no_worker.value.status_code, no_worker.value.error) == (503, "not enough gpu now")


# memory only: refused before the store or the registry is asked
async def test_bearer_without_auth_on_the_proxy_paths_says_what_to_send(
        make_gateway: MakeGateway) -> None:
    gateway = await make_gateway()
    async with aiohttp.ClientSession() as s:
        async with s.post(gateway.url + "/api/generate", json={},
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status == 404
            message = (await r.json())["error"]
        assert "'Auth: <serverless id>-<api key>'" in message and "Bearer" in message
        async with s.post(gateway.url + "/v1/chat/completions", json={}) as r:
            assert r.status == 404
            assert "'Auth: <serverless id>-<api key>'" in (await r.json())["error"]["message"]


# ---- headers that cannot travel ---------------------------------------------------------

@BOTH_STORES
async def test_invalid_utf8_in_a_header_is_400_and_the_link_keeps_serving(
        llm: FakeLLM, make_gateway: MakeGateway, make_worker: MakeWorker) -> None:
    gateway = await make_gateway()
    await ready(gateway, llm, make_worker)
    gate = llm.gate("held")
    async with aiohttp.ClientSession() as s:
        held = await s.post(gateway.url + "/api/generate", json={"chunks": 3},
                            headers={**AUTH, "X-Gate": "held"})
        assert held.status == 200 and await held.content.readline()
        answer = await raw_exchange(gateway.url, b"GET /api/tags HTTP/1.1\r\nHost: x\r\n"
                                                 b"Auth: sid1-k1\r\nX-Name: caf\xe9\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        assert b"header 'X-Name' is not valid UTF-8" in answer
        gate.set()
        assert (await held.read()).count(b"\n") == 3  # the concurrent stream was not cut
        assert gateway.linked() == 1
        async with s.get(gateway.url + "/v1/models", headers=AUTH) as r:
            assert r.status == 200


@BOTH_STORES
@pytest.mark.parametrize("transport", ["auto", "plain"], ids=["link", "http"])
async def test_a_header_outside_latin1_is_a_clear_400(
        llm: FakeLLM, make_gateway: MakeGateway, make_worker: MakeWorker,
        transport: str) -> None:
    gateway = await make_gateway(proxy_response_timeout=20.0)
    await ready(gateway, llm, make_worker, transport=transport)
    async with aiohttp.ClientSession() as s:
        async with asyncio.timeout(10):  # not a hang until the response timeout
            async with s.post(gateway.url + "/v1/chat/completions", json={},
                              headers={**AUTH, "X-Title": "caf\u00e9 \u20ac"}) as r:
                assert r.status == 400
                error = (await r.json())["error"]
        assert "'X-Title' has a character outside Latin-1" in error["message"]
        async with s.get(gateway.url + "/v1/models", headers=AUTH) as r:
            assert r.status == 200  # the worker goes on serving
    assert [seen["path"] for seen in llm.seen] == ["/v1/models"]


# ---- a proxy link client that never reads -----------------------------------------------

async def _silent_link(gateway: Gateway) -> asyncio.StreamWriter:
    """Register a worker and dial its proxy link by hand; then never read from it."""
    async with aiohttp.ClientSession() as s:
        async with s.post(gateway.agent_url() + "/apis/v1/proxy/register",
                          json={"workerID": "w1", "url": "http://127.0.0.1:9",
                                "ready": True}) as r:
            assert r.status == 200
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    url = URL(gateway.url)
    await asyncio.get_running_loop().sock_connect(sock, (url.host, url.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET /agent/{SID}/apis/v1/proxy/link?workerID=w1 HTTP/1.1\r\n"
                 f"Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
    return writer  # its reader stops reading once a few KiB wait in it


# memory only: the link's flow control is the replica's own (no store in it)
async def test_a_link_that_never_reads_holds_back_small_request_bodies(
        make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(proxy_response_timeout=1.0)
    link_end = await _silent_link(gateway)
    try:
        await until(lambda: gateway.linked() == 1, what="link up")
        link = gateway.router.registry.get(SID, "w1").link  # type: ignore[union-attr]
        assert link is not None
        body = b"x" * 150_000  # small: sent whole with the request's LinkOpen
        count = 200  # 30 MB in all
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as s:
            async def one() -> int:
                async with s.post(gateway.url + "/api/generate", data=body,
                                  headers=AUTH) as r:
                    return r.status

            statuses = await asyncio.gather(*(one() for _ in range(count)))
        assert set(statuses) == {408}  # no worker answer: each ends at the response limit
        # the writer's limit (4 MB) plus what the sockets hold, not all 30 MB
        assert link.opened < count // 2, link.opened
    finally:
        link_end.close()


# ---- the registration endpoints: the agent API's checks ---------------------------------

# memory only: refused before the registry (so nothing is shared over NATS either)
@pytest.mark.parametrize("sid", ["%2E%2E", "x" * 3000, "%00", "a%2Fb"])
@pytest.mark.parametrize("endpoint", ["register", "deregister", "workers", "link"])
async def test_registration_refuses_invalid_serverless_ids(
        make_gateway: MakeGateway, sid: str, endpoint: str) -> None:
    gateway = await make_gateway()
    url = URL(f"{gateway.url}/agent/{sid}/apis/v1/proxy/{endpoint}", encoded=True)
    body = {"workerID": "w1", "url": "http://127.0.0.1:1", "ready": True}
    async with aiohttp.ClientSession() as s:
        method = "GET" if endpoint in ("workers", "link") else "POST"
        async with s.request(method, url, json=body) as r:
            assert r.status == 400, await r.text()
            assert "serverless id" in (await r.json())["error"]
    assert gateway.router.registry._by_sid == {}


# memory only: refused before the registry (so nothing is shared over NATS either)
async def test_registration_bodies_are_bounded_and_checked_after_the_token(
        make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(worker_token="wt")
    url = gateway.agent_url() + "/apis/v1/proxy/register"
    big = b'{"workerID": "w1", "url": "http://127.0.0.1:1", "ready": true, "x": "' \
        + b"y" * (1024 * 1024) + b'"}'
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=big, headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 401  # the token first: nothing read for a stranger
        async with s.post(url, data=big, headers={"Authorization": "Bearer wt"}) as r:
            assert r.status == 400
            assert "body too large: the limit is 65536 bytes" in (await r.json())["error"]
            assert "proxy" in r.headers["Spirit-Agent-Features"]
        async with s.post(url, data=b"{nope", headers={"Authorization": "Bearer wt"}) as r:
            assert r.status == 400 and "invalid registration JSON" in (await r.json())["error"]
    assert gateway.router.registry._by_sid == {}
