"""A sync client that goes away before its answer: the request ends as cancelled (499),
taken out of the queue or, when running, with a cancel notice to its worker."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from spirit_gpu.protocol import link as lp
from tests.conftest import until
from tests.gateway.conftest import AUTH, KEY
from tests.gateway.serving import Served

Ws = aiohttp.ClientWebSocketResponse


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def open_link(session: aiohttp.ClientSession, port: int, sid: str) -> Ws:
    ws = await session.ws_connect(f"http://127.0.0.1:{port}/agent/{sid}/apis/v1/link",
                                  headers={lp.BATCH_HEADER: "1"})
    assert isinstance(lp.decode(await ws.receive_bytes(timeout=5)), lp.Welcome)
    return ws


async def frames(ws: Ws, kind: type[lp.Frame], within: float = 10.0) -> lp.Frame:
    async with asyncio.timeout(within):
        while True:
            for frame in lp.decode_all(await ws.receive_bytes()):
                if isinstance(frame, kind):
                    return frame


async def send_sync(port: int, sid: str) -> asyncio.StreamWriter:
    """Send a whole sync request and never read the answer; closing the writer leaves."""
    body = json.dumps({"input": {"n": 1}}).encode()
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST /v1/{sid}/sync HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                 .encode() + body)
    await writer.drain()
    return writer


async def queue_length(session: aiohttp.ClientSession, port: int, sid: str) -> int:
    async with session.get(f"http://127.0.0.1:{port}/v1/{sid}/status", headers=AUTH) as r:
        return int((await r.json())["queueingCount"])


async def test_a_running_sync_request_is_cancelled_when_its_client_leaves(
        served: Served, session: aiohttp.ClientSession) -> None:
    port = await served()
    ws = await open_link(session, port, "run")
    await lp_send(ws, lp.Credit(n=1))
    client = await send_sync(port, "run")
    job = await frames(ws, lp.Dispatch)
    assert isinstance(job, lp.Dispatch)
    await lp_send(ws, lp.Metric(request_id=job.request_id, status="executing"))
    client.close()  # the client goes away mid-job
    cancel = await frames(ws, lp.Cancel)
    assert isinstance(cancel, lp.Cancel) and cancel.request_ids == [job.request_id]
    async with session.get(f"http://127.0.0.1:{port}/v1/run/status",
                           params={"requestID": job.request_id}, headers=AUTH) as r:
        st = await r.json()
    assert (st["status"], st["statusCode"], st["message"]) == \
        ("cancelled", 499, "client closed the request")
    await ws.close()


async def test_a_queued_sync_request_leaves_the_queue_when_its_client_leaves(
        served: Served, session: aiohttp.ClientSession) -> None:
    port = await served()
    ws = await open_link(session, port, "q")  # a worker, but with no credits: it queues

    async def queued() -> bool:
        return await queue_length(session, port, "q") == 1
    client = await send_sync(port, "q")
    await until(queued, 10, "the request queued")
    client.close()

    async def emptied() -> bool:
        return await queue_length(session, port, "q") == 0
    await until(emptied, 10, "the queue emptied")
    await lp_send(ws, lp.Credit(n=1))
    with pytest.raises(TimeoutError):  # nothing left to dispatch
        await frames(ws, lp.Dispatch, within=0.3)
    await ws.close()


async def lp_send(ws: Ws, frame: lp.Frame) -> None:
    await ws.send_bytes(lp.encode(frame))
