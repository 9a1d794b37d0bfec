"""The worker link as a hostile or broken worker would use it, frame by frame:
forged results, huge credits, empty chunks, giant heartbeats, oversized results."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from spirit_gpu.gateway.app import create_app
from spirit_gpu.gateway.config import GatewayConfig
from spirit_gpu.gateway.storage.memory import MemoryStorage
from spirit_gpu.protocol import link as lp
from tests.conftest import free_port, until
from tests.gateway.conftest import AUTH, KEY, GatewayFactory, Gw

HOOK = "http://127.0.0.1:9/h"
Ws = aiohttp.ClientWebSocketResponse


async def open_link(gw: Gw, sid: str) -> Ws:
    ws = await gw.session.ws_connect(f"{gw.agent(sid)}/link", headers={lp.BATCH_HEADER: "1"})
    welcome = lp.decode(await ws.receive_bytes(timeout=5))
    assert isinstance(welcome, lp.Welcome)
    return ws


async def send(ws: Ws, *frames: lp.Frame) -> None:
    await ws.send_bytes(lp.encode_many(list(frames)))


async def dispatches(ws: Ws, n: int, within: float = 10.0) -> list[lp.Dispatch]:
    got: list[lp.Dispatch] = []
    async with asyncio.timeout(within):
        while len(got) < n:
            got += [f for f in lp.decode_all(await ws.receive_bytes())
                    if isinstance(f, lp.Dispatch)]
    return got


async def submit(gw: Gw, sid: str, value: object = 1) -> str:
    code, body, _ = await gw.call("POST", f"/v1/{sid}/async",
                                  json_body={"input": value, "webhook": HOOK})
    assert code == 200, body
    return str(body["id"])


async def test_frames_about_requests_not_dispatched_to_the_link_are_refused(
        gw: Gw, capsys: pytest.CaptureFixture[str]) -> None:
    owner, forger = await open_link(gw, "f"), await open_link(gw, "f")
    rid = await submit(gw, "f")
    await send(owner, lp.Credit(n=1))
    (job,) = await dispatches(owner, 1)
    assert job.request_id == rid
    queued = await submit(gw, "f")  # never dispatched to anyone (no credits left)
    for target in (rid, queued):
        await send(forger, lp.Metric(request_id=target, status="executing"),
                   lp.Chunk(request_id=target, seq=0, data=b'"forged"'),
                   lp.Result(request_id=target, status_code=200, message="", data=b'"forged"'),
                   lp.Ack(request_id=target))

    await forger.close()  # the gateway reads every frame before it sees the close
    out: list[str] = []

    async def summed_up() -> bool:
        out.append(capsys.readouterr().out)
        return "8 frame(s) about requests not dispatched to it were refused" in "".join(out)
    await until(summed_up, 10, "the forger's link summary")
    assert (await gw.status("f", queued))["status"] == "queueing"
    assert (await gw.status("f", rid))["result"] is None
    await send(owner, lp.Result(request_id=rid, status_code=200, message="", data=b'"real"'),
               lp.Ack(request_id=rid))

    async def real() -> dict[str, Any] | None:
        st = await gw.status("f", rid)
        return st if st["status"] == "succeed" else None
    st = await until(real, 10, "the real result")
    assert st["result"] == "InJlYWwi"  # base64 of "real"
    await owner.close()


async def test_credits_are_capped_so_one_link_cannot_take_the_queue(
        gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(link_max_credits=5)
    greedy = await open_link(gw, "c")
    for i in range(20):
        await submit(gw, "c", i)
    await send(greedy, lp.Credit(n=10**9))
    first = lp.decode_all(await greedy.receive_bytes(timeout=10))
    assert len(first) <= 5
    got = await dispatches(greedy, 5 - len(first)) if len(first) < 5 else []
    assert len(first) + len(got) == 5
    healthy = await open_link(gw, "c")
    await send(healthy, lp.Credit(n=3))
    assert len(await dispatches(healthy, 3)) == 3
    with pytest.raises(TimeoutError):  # nothing more for the greedy link
        await dispatches(greedy, 1, within=0.3)
    code, body, _ = await gw.call("GET", "/v1/c/status")
    assert body["queueingCount"] == 12
    for ws in (greedy, healthy):
        await ws.close()


async def test_empty_stream_chunks_count_toward_the_chunk_cap(
        gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(max_result_bytes_sync=64 * 1024)  # also the chunk cap
    ws = await open_link(gw, "e")
    rid = await submit(gw, "e")
    await send(ws, lp.Credit(n=1))
    await dispatches(ws, 1)
    await send(ws, lp.Metric(request_id=rid, status="executing"))
    for start in range(0, 4000, 1000):
        await send(ws, *(lp.Chunk(request_id=rid, seq=i, data=b"")
                         for i in range(start, start + 1000)))
    await send(ws, lp.Result(request_id=rid, status_code=200, message="", data=b"[]"))
    await until(lambda: _done(gw, "e", rid), 10, "the result")
    async with gw.session.get(f"{gw.url}/v1/e/stream", params={"requestID": rid},
                              headers=AUTH) as resp:
        events = (await resp.read()).count(b"id: ")
    assert 0 < events <= 64 * 1024 // 128
    await ws.close()


async def _done(gw: Gw, sid: str, rid: str) -> bool:
    return bool((await gw.status(sid, rid))["status"] in ("succeed", "failed"))


class CountingStorage(MemoryStorage):
    """The memory store, counting what heartbeats hand it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.heartbeat_ids: list[list[str]] = []
        self.gets = 0

    async def heartbeat(self, sid: str, worker: str, request_ids: list[str]) -> list[str]:
        self.heartbeat_ids.append(list(request_ids))
        return await super().heartbeat(sid, worker, request_ids)

    async def get(self, sid: str, request_id: str) -> Any:
        self.gets += 1
        return await super().get(sid, request_id)


@pytest.fixture
async def counted() -> AsyncIterator[tuple[Gw, CountingStorage]]:
    config = GatewayConfig(api_keys=[KEY], sweep_interval=0.05, link_max_credits=8)
    storage = CountingStorage()
    runner = web.AppRunner(create_app(config, storage), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    async with aiohttp.ClientSession() as session:
        yield Gw(f"http://127.0.0.1:{port}", config, runner.app, session), storage
    await runner.cleanup()


async def test_a_heartbeat_naming_many_ids_looks_only_at_what_the_link_can_hold(
        counted: tuple[Gw, CountingStorage]) -> None:
    gw, storage = counted
    ws = await open_link(gw, "h")
    rid = await submit(gw, "h")
    await send(ws, lp.Credit(n=1))
    await dispatches(ws, 1)
    other = await submit(gw, "h")  # queued, not this link's
    junk = [str(uuid.uuid4()) for _ in range(300_000)]
    gets_before = storage.gets
    started = time.monotonic()
    await send(ws, lp.Heartbeat(request_ids=[rid, other, *junk]))

    async def beat() -> bool:
        return bool(storage.heartbeat_ids)
    await until(beat, 30, "the heartbeat")
    assert storage.heartbeat_ids == [[rid]]
    assert storage.gets - gets_before <= 8 + 1  # at most the credit cap of lookups
    assert time.monotonic() - started < 10
    await ws.close()


async def test_a_result_over_the_link_limit_fails_the_request_as_too_large(
        gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(max_result_bytes_sync=32 * 1024, max_body_bytes=32 * 1024,
                               sync_timeout=20)
    ws = await open_link(gw, "big")
    await send(ws, lp.Credit(n=1))
    started = time.monotonic()
    client = asyncio.create_task(gw.call("POST", "/v1/big/sync", json_body={"input": 1}))
    (job,) = await dispatches(ws, 1)
    await send(ws, lp.Result(request_id=job.request_id, status_code=200, message="",
                             data=b"x" * (2 * 1024 * 1024)))
    msg = await ws.receive(timeout=10)
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    code, body, _ = await client
    assert code == 500, body
    assert body["error"].startswith("result too large"), body
    assert time.monotonic() - started < 10  # not the lease, not the sync timeout


async def test_a_result_over_the_requests_limit_fails_it_and_is_logged(
        gateway_factory: GatewayFactory, capsys: pytest.CaptureFixture[str]) -> None:
    gw = await gateway_factory(max_result_bytes_sync=32 * 1024, sync_timeout=20)
    ws = await open_link(gw, "big")
    await send(ws, lp.Credit(n=1))
    client = asyncio.create_task(gw.call("POST", "/v1/big/sync", json_body={"input": 1}))
    (job,) = await dispatches(ws, 1)
    # under what the link carries (the sync limit + 1 MB), over the request's limit
    await send(ws, lp.Result(request_id=job.request_id, status_code=200, message="",
                             data=b"x" * (64 * 1024)))
    code, body, _ = await client
    why = "result too large: 65536 bytes, the limit for sync requests is 32768 bytes"
    assert (code, body["error"]) == (500, why), body
    out = capsys.readouterr().out
    assert "the worker's result was refused" in out and why in out, out
    assert job.request_id in out
    await ws.close()


async def test_a_link_flooding_forged_frames_is_closed(gw: Gw) -> None:
    ws = await open_link(gw, "flood")
    forged = [lp.Result(request_id=str(uuid.uuid4()), status_code=200, message="", data=b"1")
              for _ in range(1500)]
    await send(ws, *forged)
    msg = await ws.receive(timeout=10)
    assert msg.type == aiohttp.WSMsgType.CLOSE
    assert msg.data == aiohttp.WSCloseCode.POLICY_VIOLATION
