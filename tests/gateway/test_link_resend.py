"""The worker link loses nothing it wrote when the connection dies under it: the
gateway confirms what it stored (``Stored``), the worker resends the rest on its
next link, and duplicates change nothing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from spirit_gpu.gateway.link_server import Handled
from spirit_gpu.gateway.service import GATEWAY_KEY
from spirit_gpu.gateway.storage.memory import MemoryStorage
from spirit_gpu.protocol import link as lp
from spirit_gpu.supervisor.jobs import Job, metric
from spirit_gpu.supervisor.transports.base import AgentUnavailable
from spirit_gpu.supervisor.transports.link import LinkTransport
from tests.conftest import free_port, until
from tests.gateway.conftest import AUTH, BOTH_STORES, GatewayFactory, Gw, Webhooks
from tests.gateway.link_relay import Relay

HOOK = "http://127.0.0.1:9/h"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def relay(gw: Gw) -> AsyncIterator[Relay]:
    port = int(gw.url.rsplit(":", 1)[1])
    r = await Relay(port).start()
    yield r
    await r.close()


async def submit(gw: Gw, sid: str) -> str:
    code, body, _ = await gw.call("POST", f"/v1/{sid}/async",
                                  json_body={"input": 1, "webhook": HOOK})
    assert code == 200
    return str(body["id"])


async def pulled(link: LinkTransport) -> Job:
    async def one() -> list[Job]:
        return (await link.pull(1)).jobs
    (job,) = await until(one, 10, "a job over the link")
    job.started_at = job.received_at
    return job


async def status(gw: Gw, sid: str, rid: str) -> str:
    return str((await gw.status(sid, rid))["status"])


async def stream(gw: Gw, sid: str, rid: str) -> bytes:
    async with gw.session.get(f"{gw.url}/v1/{sid}/stream", params={"requestID": rid},
                              headers=AUTH) as resp:
        return await resp.read()


def events(*items: bytes) -> bytes:
    out = b"".join(b"id: %d\ndata: %s\n\n" % (i, item) for i, item in enumerate(items))
    return out + b'event: end\ndata: {"statusCode":200,"status":"succeed"}\n\n'


@BOTH_STORES
async def test_frames_written_into_a_dying_connection_reach_the_gateway_once(
        gw: Gw, relay: Relay, session: aiohttp.ClientSession) -> None:
    link = LinkTransport(session, f"{relay.url}/agent/rs")
    await link.connect()
    rid = await submit(gw, "rs")
    job = await pulled(link)
    await link.metric(job, metric(job, "executing"))
    await link.chunk(job, 0, b'{"i": 0}')

    async def executing() -> bool:
        return await status(gw, "rs", rid) == "executing"
    await until(executing, 10, "the executing metric stored")
    # the connection takes what the worker writes next and delivers none of it
    relay.swallow()
    await link.chunk(job, 1, b'{"i": 1}')
    await link.chunk(job, 2, b'{"i": 2}')
    await link.result(job, 200, "", b'{"ok": true}')
    await link.metric(job, metric(job, "succeed"))
    await link.ack(job)
    await relay.swallowed_at_least(len(lp.encode_many([
        lp.Chunk(rid, 1, b'{"i": 1}'), lp.Chunk(rid, 2, b'{"i": 2}'),
        lp.Result(rid, 200, "", b'{"ok": true}')])))
    await relay.cut()

    async def succeeded() -> bool:  # the worker's next call opens a new link
        with contextlib.suppress(AgentUnavailable):
            await link.pull(1)
        return await status(gw, "rs", rid) == "succeed"
    await until(succeeded, 15, "the result resent on the next link")
    assert relay.connections == 2
    assert await stream(gw, "rs", rid) == events(b'{"i": 0}', b'{"i": 1}', b'{"i": 2}')
    await link.close()


async def test_frames_stored_but_not_confirmed_are_sent_again_and_change_nothing(
        gw: Gw, relay: Relay, session: aiohttp.ClientSession) -> None:
    """The gateway stored everything, but its confirmation was lost with the
    connection: the worker sends it all again, and nothing changes."""
    link = LinkTransport(session, f"{relay.url}/agent/rd")
    await link.connect()
    rid = await submit(gw, "rd")
    job = await pulled(link)
    relay.swallow(answers=True)  # no Stored reaches the worker from here
    await link.metric(job, metric(job, "executing"))
    for i in range(3):
        await link.chunk(job, i, b'{"i": %d}' % i)
    await link.result(job, 200, "", b'{"ok": true}')
    await link.metric(job, metric(job, "succeed"))
    await link.ack(job)

    async def succeeded() -> bool:
        return await status(gw, "rd", rid) == "succeed"
    await until(succeeded, 10, "the result")
    first = await gw.status("rd", rid)
    assert len(link.unconfirmed) == 7  # metrics, chunks, result, ack: all kept
    await relay.cut()

    async def confirmed() -> bool:  # on the next link, sent again and confirmed
        with contextlib.suppress(AgentUnavailable):
            await link.pull(1)
        return not link.unconfirmed
    await until(confirmed, 15, "the frames confirmed on the next link")
    assert relay.connections == 2
    assert await stream(gw, "rd", rid) == events(b'{"i": 0}', b'{"i": 1}', b'{"i": 2}')
    assert await gw.status("rd", rid) == first
    await link.close()


async def test_a_result_larger_than_the_link_carries_is_not_sent_again(
        gateway_factory: GatewayFactory, session: aiohttp.ClientSession) -> None:
    gw = await gateway_factory(max_result_bytes_sync=32 * 1024, max_body_bytes=32 * 1024)
    link = LinkTransport(session, f"{gw.url}/agent/big")
    await link.connect()
    rid = await submit(gw, "big")
    job = await pulled(link)
    await link.result(job, 200, "", b"x" * (2 * 1024 * 1024))

    async def failed() -> dict[str, Any] | None:
        st = await gw.status("big", rid)
        return st if st["status"] == "failed" else None
    st = await until(failed, 10, "the request failed as too large")
    assert st["message"].startswith("result too large")
    assert not link.unconfirmed  # never kept: it would close every next link again
    second = await submit(gw, "big")

    async def relinked() -> bool:
        with contextlib.suppress(AgentUnavailable):
            jobs = (await link.pull(1)).jobs
            return bool(jobs) and jobs[0].request_id == second
        return False
    await until(relinked, 10, "the next job on a new link")
    await link.close()


@BOTH_STORES  # on NATS, frames of different requests are handled at once
async def test_the_gateway_confirms_every_frame_once_handled_and_only_when_asked(
        gw: Gw) -> None:
    confirming = await gw.session.ws_connect(
        f"{gw.agent('ok')}/link", headers={lp.BATCH_HEADER: "1", lp.STORED_HEADER: "1"})
    welcome = lp.decode(await confirming.receive_bytes(timeout=5))
    assert isinstance(welcome, lp.Welcome)
    assert lp.STORED in welcome.features
    config = gw.config  # the largest message the link reads
    assert welcome.max_message == max(config.max_result_bytes_sync, config.max_body_bytes) \
        + 1024 * 1024
    rids = [await submit(gw, "ok") for _ in range(2)]
    await confirming.send_bytes(lp.encode(lp.Credit(n=2)))
    got: list[lp.Frame] = []
    while len([f for f in got if isinstance(f, lp.Dispatch)]) < 2:
        got += lp.decode_all(await confirming.receive_bytes(timeout=10))
    a, b = rids
    frames: list[lp.Frame] = [
        lp.Metric(a, "executing"), lp.Chunk(a, 0, b"0"), lp.Metric(b, "executing"),
        lp.Chunk(b, 0, b"0"), lp.Chunk(a, 1, b"1"), lp.Result(a, 200, "", b"1"),
        lp.Heartbeat([a, b]), lp.Result(b, 200, "", b"2"), lp.Ack(a), lp.Ack(b)]
    await confirming.send_bytes(lp.encode_many(frames[:4]))
    await confirming.send_bytes(lp.encode_many(frames[4:]))
    upto = 0
    while upto < 1 + len(frames):  # the credit, then these
        for f in lp.decode_all(await confirming.receive_bytes(timeout=10)):
            if isinstance(f, lp.Stored):
                assert f.upto > upto
                upto = f.upto
    assert upto == 1 + len(frames)
    for rid in rids:  # confirmed: stored
        assert await status(gw, "ok", rid) == "succeed"
    await confirming.close()

    plain = await gw.session.ws_connect(f"{gw.agent('ok')}/link",
                                        headers={lp.BATCH_HEADER: "1"})
    lp.decode(await plain.receive_bytes(timeout=5))
    rid = await submit(gw, "ok")
    await plain.send_bytes(lp.encode(lp.Credit(n=1)))
    seen: list[lp.Frame] = []
    while not any(isinstance(f, lp.Dispatch) for f in seen):
        seen += lp.decode_all(await plain.receive_bytes(timeout=10))
    await plain.send_bytes(lp.encode_many([lp.Metric(rid, "executing"),
                                           lp.Result(rid, 200, "", b"1")]))

    async def done() -> bool:
        return await status(gw, "ok", rid) == "succeed"
    await until(done, 10, "the result")
    await submit(gw, "ok")
    await plain.send_bytes(lp.encode(lp.Credit(n=1)))
    seen = []
    while not any(isinstance(f, lp.Dispatch) for f in seen):
        seen += lp.decode_all(await plain.receive_bytes(timeout=10))
    assert not [f for f in seen if isinstance(f, lp.Stored)]  # a frame it could not read
    await plain.close()


def test_handled_is_the_longest_run_of_frames_handled_from_the_first() -> None:
    h = Handled()
    one, two, three, four = (h.start() for _ in range(4))
    assert (one, four, h.upto) == (1, 4, 0)
    h.finish(three)  # out of order: 1 and 2 still being handled
    h.finish(two)
    assert h.upto == 0
    h.finish(one)
    assert h.upto == 3
    assert h.start() == 5
    h.finish(5)
    assert h.upto == 3  # 4 never finished (it failed): nothing after it counts
    h.finish(four)
    assert h.upto == 5


@pytest.fixture
async def old_gateway() -> AsyncIterator[tuple[str, list[lp.Frame]]]:
    """A gateway from before confirmations, as its Welcome and behaviour say (it reads
    frames; it names no ``stored``, sends no ``max_message`` and confirms nothing)."""
    read: list[lp.Frame] = []

    async def link(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        assert request.headers.get(lp.STORED_HEADER) == "1"  # asked, not answered
        await ws.send_bytes(b"\x94\xa7welcome\x01\xcdN \x91\xa5batch")
        async for msg in ws:
            read.extend(lp.decode_all(msg.data))
        return ws

    app = web.Application()
    app.router.add_get("/agent/old/apis/v1/link", link)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}/agent/old", read
    await runner.cleanup()


async def test_a_gateway_that_does_not_confirm_gets_frames_as_before(
        old_gateway: tuple[str, list[lp.Frame]], session: aiohttp.ClientSession) -> None:
    url, read = old_gateway
    link = LinkTransport(session, url)
    await link.connect()
    assert lp.STORED not in link.features
    job = Job(request_id="r1")
    await link.chunk(job, 0, b"0")
    await link.result(job, 200, "", b"1")
    await link.ack(job)
    await until(lambda: len(read) == 3, 10, "the frames read")
    assert not link.unconfirmed  # nothing kept for a gateway that never confirms
    await link.close()
    assert read == [lp.Chunk("r1", 0, b"0"), lp.Result("r1", 200, "", b"1"), lp.Ack("r1")]


async def test_a_link_workers_webhook_call_waits_for_the_result_its_link_carries(
        gw: Gw, webhooks: Webhooks) -> None:
    """The worker's webhook call (through the relay) may reach the gateway before
    the link's last chunks and result are stored: it does not end the request
    itself, so the stream is not cut short."""
    ws = await gw.session.ws_connect(f"{gw.agent('wh')}/link",
                                     headers={lp.BATCH_HEADER: "1", lp.STORED_HEADER: "1"})
    lp.decode(await ws.receive_bytes(timeout=5))
    code, body, _ = await gw.call("POST", "/v1/wh/async",
                                  json_body={"input": 1, "webhook": webhooks.url})
    assert code == 200
    rid = body["id"]
    await ws.send_bytes(lp.encode(lp.Credit(n=1)))
    got: list[lp.Frame] = []
    while not any(isinstance(f, lp.Dispatch) for f in got):
        got += lp.decode_all(await ws.receive_bytes(timeout=10))
    (job,) = [f for f in got if isinstance(f, lp.Dispatch)]
    await ws.send_bytes(lp.encode_many([lp.Metric(rid, "executing"), lp.Chunk(rid, 0, b"0")]))

    async def executing() -> bool:
        return await status(gw, "wh", rid) == "executing"
    await until(executing, 10, "the first chunk stored")
    relay = asyncio.ensure_future(gw.session.post(
        job.webhook, params={"requestID": rid, "statusCode": "200"}, data=b"[0, 1]"))
    storage = gw.app[GATEWAY_KEY].storage
    assert isinstance(storage, MemoryStorage)
    entry = storage._entry("wh", rid)  # (observed, not changed: the call is waiting)
    assert entry is not None
    await until(lambda: entry.done_waiters, 10, "the webhook call waiting for the result")
    await ws.send_bytes(lp.encode_many([lp.Chunk(rid, 1, b"1"),
                                        lp.Result(rid, 200, "", b"[0, 1]")]))
    async with await relay as resp:
        assert resp.status == 200
    (query, delivered), = await webhooks.wait(1)
    assert (query["statusCode"], delivered) == ("200", b"[0, 1]")
    assert await stream(gw, "wh", rid) == events(b"0", b"1")
    await ws.close()
