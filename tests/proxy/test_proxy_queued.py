"""The proxy route through the request queue (DESIGN.md 5a), on both stores.

A worker that does not register (the original spirit-gpu worker in proxy mode)
takes proxied requests as queue jobs and answers them on ``request-proxy``; the
client waiting on the proxy route gets that answer as it streams, also when
the worker posted it to another gateway replica than the client's (NATS). Here
the worker is a scripted plain-protocol client: the one that speaks this in
production is the original package (tests/compat/test_original_proxy.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import msgspec
import pytest

from spirit_gpu.protocol.agent import ProxyJob
from tests.conftest import until
from tests.proxy.conftest import AUTH, BOTH_STORES, KEY, SID, Gateway

# two replicas share one queue only through NATS
NATS_ONLY = pytest.mark.parametrize("store", ["nats"], indirect=True)
MakeGateway = Callable[..., Awaitable[Gateway]]


class QueueWorker:
    """Takes proxy jobs from the agent API and answers them, as the original worker does."""

    def __init__(self, session: aiohttp.ClientSession, gateway: Gateway) -> None:
        self.session = session
        self.base = gateway.agent_url() + "/apis/v1"

    async def take(self) -> tuple[str, ProxyJob]:
        while True:
            async with self.session.get(self.base + "/request", params={"wait": "1000"}) as r:
                if r.status == 200:
                    env = await r.json()
                    break
        job = msgspec.json.decode(base64.b64decode(env["body"]), type=ProxyJob)
        return env["headers"]["Ease-Request-Id"], job

    async def post(self, path: str, **kw: Any) -> tuple[int, Any]:
        async with self.session.post(f"{self.base}/{path}", **kw) as r:
            return r.status, await r.json()

    async def metric(self, rid: str, status: str, message: str = "") -> None:
        code, _ = await self.post(f"request-metric/{rid}",
                                  json={"status": status, "message": message})
        assert code == 200

    async def answer(self, rid: str, status: int, data: Any,
                     headers: dict[str, str] | None = None) -> tuple[int, Any]:
        return await self.post(f"request-proxy/{rid}", params={"statusCode": str(status)},
                               data=data, headers=headers)


async def polling(gateway: Gateway, session: aiohttp.ClientSession,
                  seen_by: Gateway | None = None
                  ) -> tuple[QueueWorker, asyncio.Task[tuple[str, ProxyJob]]]:
    """A worker of ``gateway`` waiting for a job, once ``seen_by`` (default: the same
    gateway) counts it as present (on NATS its presence reaches the store a moment
    after its first poll)."""
    worker = QueueWorker(session, gateway)
    taking = asyncio.create_task(worker.take())
    await until(lambda: (seen_by or gateway).core.storage.has_worker(SID),
                what="the worker present")
    return worker, taking


async def status_of(session: aiohttp.ClientSession, gateway: Gateway,
                    rid: str) -> dict[str, Any]:
    async with session.get(f"{gateway.url}/v1/{SID}/status", params={"requestID": rid},
                           headers={"Authorization": f"Bearer {KEY}"}) as r:
        return dict(await r.json()) if r.status == 200 else {}


@BOTH_STORES
async def test_an_answer_streams_from_the_queue_worker_to_the_client(
        make_gateway: MakeGateway) -> None:
    gateway = await make_gateway()
    release = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b'{"response": "a", "done": false}\n'
        await release.wait()
        yield b'{"response": "", "done": true}\n'

    async with aiohttp.ClientSession() as s:
        worker, taking = await polling(gateway, s)
        client = asyncio.create_task(s.post(gateway.url + "/api/generate?x=1",
                                            headers={**AUTH, "X-Custom": "v"},
                                            json={"prompt": "hi"}))
        rid, job = await asyncio.wait_for(taking, 15)
        assert (job.method, job.uri) == ("POST", "/api/generate?x=1")
        assert job.header["X-Custom"] == ["v"] and "Auth" not in job.header
        assert json.loads(base64.b64decode(job.body)) == {"prompt": "hi"}
        await worker.metric(rid, "executing")
        answering = asyncio.create_task(worker.answer(
            rid, 200, body(), {"Content-Type": "application/x-ndjson", "X-Upstream": "u"}))
        r = await asyncio.wait_for(client, 15)
        assert r.status == 200 and r.headers["Ease-Request-Id"] == rid
        assert r.headers["X-Upstream"] == "u"
        assert r.headers["Content-Type"].startswith("application/x-ndjson")
        assert b'"done": false' in await r.content.readline()  # before the worker's last line
        release.set()
        assert b'"done": true' in await r.read()
        assert await answering == (200, {})
        await worker.metric(rid, "succeed")
        code, _ = await worker.post(f"request-ack/{rid}")
        assert code == 200

        async def succeeded() -> dict[str, Any] | None:
            found = await status_of(s, gateway, rid)
            return found if found.get("status") == "succeed" else None
        done = await until(succeeded, what="the request read as succeeded")
        assert done["statusCode"] == 200


@BOTH_STORES
async def test_no_answer_in_time_is_408_and_a_late_answer_is_dropped(
        make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(proxy_response_timeout=0.5)
    async with aiohttp.ClientSession() as s:
        worker, taking = await polling(gateway, s)
        async with s.post(gateway.url + "/v1/chat/completions", headers=AUTH, json={}) as r:
            assert r.status == 408
            error = (await r.json())["error"]  # on /v1/*: OpenAI's error shape
            assert "did not start responding in time" in error["message"]
            assert error["type"] == "timeout"
            rid = r.headers["Ease-Request-Id"]
        assert (await asyncio.wait_for(taking, 15))[0] == rid
        code, body = await worker.answer(rid, 200, b"late")
        assert code == 200 and "dropped" in body["note"]
        ended = await status_of(s, gateway, rid)
        assert ended["statusCode"] == 408, ended  # the late answer changed nothing
        assert "no proxy answer began within 0.5 s" in ended["message"]


@BOTH_STORES
async def test_a_failed_metric_before_any_answer_reaches_the_client(
        make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(proxy_response_timeout=20.0)
    async with aiohttp.ClientSession() as s:
        worker, taking = await polling(gateway, s)
        client = asyncio.create_task(s.post(gateway.url + "/api/chat", headers=AUTH, json={}))
        rid, _ = await asyncio.wait_for(taking, 15)
        await worker.metric(rid, "failed", "upstream refused the connection")
        async with asyncio.timeout(10):  # not the 20 s response limit
            r = await client
            assert r.status == 500  # on /api/*: ollama's error shape
            assert "upstream refused the connection" in (await r.json())["error"]


@NATS_ONLY
async def test_an_answer_posted_to_another_replica_streams_to_the_client(
        make_gateway: MakeGateway) -> None:
    a = await make_gateway()  # the client's
    b = await make_gateway()  # the worker's
    release = asyncio.Event()
    big = b"x" * (2 * 1024 * 1024 + 3)  # above NATS' 1 MB message limit

    async def body() -> AsyncIterator[bytes]:
        yield b"first\n"
        await release.wait()
        yield big
        yield b"\nlast\n"

    async with aiohttp.ClientSession() as s:
        worker, taking = await polling(b, s, seen_by=a)
        client = asyncio.create_task(s.post(a.url + "/api/generate", headers=AUTH, json={}))
        rid, _ = await asyncio.wait_for(taking, 15)
        answering = asyncio.create_task(worker.answer(rid, 201, body(),
                                                      {"X-Upstream": "u"}))
        r = await asyncio.wait_for(client, 15)
        assert r.status == 201 and r.headers["X-Upstream"] == "u"
        assert r.headers["Ease-Request-Id"] == rid
        assert await r.content.readline() == b"first\n"  # before the worker sent the rest
        assert not answering.done()  # the worker's POST is answered once the copy is done
        release.set()
        rest = await r.read()  # (2 MB: compared in parts, so that a failure reads well)
        assert (len(rest), rest.count(b"x"), rest[-6:]) == (len(big) + 6, len(big), b"\nlast\n")
        assert await asyncio.wait_for(answering, 15) == (200, {})
        for replica in (a, b):
            ended = await status_of(s, replica, rid)
            assert (ended["status"], ended["statusCode"]) == ("succeed", 201), ended


@NATS_ONLY
async def test_an_answer_posted_to_another_replica_after_the_408_is_dropped(
        make_gateway: MakeGateway) -> None:
    a = await make_gateway(proxy_response_timeout=0.5)
    b = await make_gateway()
    async with aiohttp.ClientSession() as s:
        worker, taking = await polling(b, s, seen_by=a)
        async with s.post(a.url + "/api/generate", headers=AUTH, json={}) as r:
            assert r.status == 408
        rid, _ = await asyncio.wait_for(taking, 15)
        code, body = await worker.answer(rid, 200, b"late")
        assert code == 200 and "dropped" in body["note"]
        ended = await status_of(s, a, rid)
        assert ended["statusCode"] == 408, ended


@NATS_ONLY
async def test_a_client_gone_mid_answer_stops_the_relay(make_gateway: MakeGateway) -> None:
    a = await make_gateway()
    b = await make_gateway()
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        while sent < 100_000:  # until the gateway stops reading
            sent += 1
            yield b"line\n" * 100

    async with aiohttp.ClientSession() as s:
        worker, taking = await polling(b, s, seen_by=a)
        client = asyncio.create_task(s.post(a.url + "/api/generate", headers=AUTH, json={}))
        rid, _ = await asyncio.wait_for(taking, 15)
        answering = asyncio.create_task(worker.answer(rid, 200, endless()))
        r = await asyncio.wait_for(client, 15)
        assert await r.content.readline() == b"line\n"
        r.close()  # the client goes away mid-answer
        code, body = await asyncio.wait_for(answering, 15)
    assert code == 200 and "transfer broke" in body["note"], body
    assert sent < 100_000



@pytest.mark.parametrize(("store", "replicas"), [("memory", 1), ("nats", 1), ("nats", 2)],
                         indirect=["store"])
async def test_a_worker_answer_that_breaks_off_cuts_the_client(
        make_gateway: MakeGateway, replicas: int) -> None:
    a = await make_gateway(proxy_transfer_timeout=60.0)  # the client's
    b = await make_gateway() if replicas == 2 else a  # the worker's
    broken = asyncio.Event()

    async def breaking() -> AsyncIterator[bytes]:
        yield b"first\n"
        await broken.wait()
        raise RuntimeError("the worker died mid-answer")

    async with aiohttp.ClientSession() as s:
        worker, taking = await polling(b, s, seen_by=a)
        client = asyncio.create_task(s.post(a.url + "/api/generate", headers=AUTH, json={}))
        rid, _ = await asyncio.wait_for(taking, 15)
        answering = asyncio.create_task(worker.answer(rid, 200, breaking()))
        r = await asyncio.wait_for(client, 15)
        assert await r.content.readline() == b"first\n"
        broken.set()
        with pytest.raises(aiohttp.ClientPayloadError):  # not a short body looking whole
            async with asyncio.timeout(15):  # nor a wait for the 60 s transfer limit
                await r.read()
        with pytest.raises(aiohttp.ClientError):
            await answering  # (the worker's own POST broke: its upload raised)

        async def ended() -> dict[str, Any] | None:
            found = await status_of(s, a, rid)
            return found if found.get("status") in ("succeed", "failed") else None
        done = await until(ended, what="the request ended")
    assert "transfer broke" in done["message"], done


@NATS_ONLY
async def test_an_answer_that_cannot_be_relayed_is_never_a_success_without_its_body(
        make_gateway: MakeGateway) -> None:
    a = await make_gateway()
    b = await make_gateway()
    b.router.registry.answer_relay = None  # a replica that cannot relay (an older version)
    async with aiohttp.ClientSession() as s:
        worker, taking = await polling(b, s, seen_by=a)
        client = asyncio.create_task(s.post(a.url + "/v1/chat/completions", headers=AUTH,
                                            json={}))
        rid, _ = await asyncio.wait_for(taking, 15)
        code, body = await worker.answer(rid, 200, b'{"object": "chat.completion"}')
        assert code == 200 and "dropped" in body["note"]
        async with asyncio.timeout(15):
            r = await client
            assert r.status == 502
            error = (await r.json())["error"]
        assert "proxy answer with no client waiting for it" in error["message"]


@BOTH_STORES
async def test_a_client_gone_before_the_answer_cancels_its_queued_job(
        make_gateway: MakeGateway) -> None:
    # the worker took the job and has not answered: the client leaving ends it (499),
    # so the worker hears of it instead of generating for nobody
    gateway = await make_gateway()
    async with aiohttp.ClientSession() as s:
        worker, taking = await polling(gateway, s)
        client = asyncio.create_task(s.post(gateway.url + "/api/generate", headers=AUTH,
                                            json={"prompt": "hi"}))
        rid, _ = await asyncio.wait_for(taking, 15)
        await worker.metric(rid, "executing")
        client.cancel()  # the client hangs up
        with contextlib.suppress(asyncio.CancelledError):
            await client

        async def cancelled() -> dict[str, Any] | None:
            found = await status_of(s, gateway, rid)
            return found if found.get("status") == "cancelled" else None
        done = await until(cancelled, 10, what="the request cancelled")
        assert (done["statusCode"], done["message"]) == (499, "client closed the request")
