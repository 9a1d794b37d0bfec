"""One test per aiohttp behaviour that ``spirit_gpu.net.aiohttp_internals`` relies on.

When an aiohttp upgrade breaks one, the test named for it fails here, not the
proxy in production.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from spirit_gpu.net.aiohttp_internals import (
    CONTINUE,
    LazyHeadResponse,
    cut_connection,
    send_continue,
)

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[int]]]:
    runners: list[web.ServerRunner] = []

    async def start(handler: Handler) -> int:
        runner = web.ServerRunner(web.Server(handler), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return int(runner.addresses[0][1])

    yield start
    for runner in runners:
        await runner.cleanup()


def record_writes(request: web.BaseRequest) -> list[bytes]:
    """What the response writes to the transport, one entry per write call."""
    transport: Any = request.transport
    writes: list[bytes] = []
    write, writelines = transport.write, transport.writelines
    transport.write = lambda data: (writes.append(bytes(data)), write(data))
    transport.writelines = lambda parts: (writes.append(b"".join(parts)), writelines(parts))
    return writes


@pytest.mark.parametrize("lazy", [True, False])
async def test_lazy_head_waits_for_the_first_body_bytes(
        serve: Callable[[Handler], Awaitable[int]], lazy: bool) -> None:
    seen: list[list[bytes]] = []

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        writes = record_writes(request)
        resp = (LazyHeadResponse if lazy else web.StreamResponse)(headers={"X-A": "1"})
        await resp.prepare(request)
        seen.append(list(writes))  # after prepare
        await resp.write(b"first")
        seen.append(list(writes))  # after the first write
        await resp.write_eof()
        return resp

    port = await serve(handler)
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/") as r:
        assert await r.read() == b"first"
    after_prepare, after_first = seen
    if lazy:  # nothing at prepare; then head and bytes in one write
        assert after_prepare == []
        assert len(after_first) == 1
        assert after_first[0].startswith(b"HTTP/1.1 200 OK") and b"first" in after_first[0]
    else:  # what aiohttp's StreamResponse does: the head alone, at prepare
        assert len(after_prepare) == 1 and b"first" not in after_prepare[0]


async def test_lazy_head_send_head_sends_a_held_head_alone(
        serve: Callable[[Handler], Awaitable[int]]) -> None:
    go_on = asyncio.Event()

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        resp = LazyHeadResponse()
        await resp.prepare(request)
        await resp.send_head()
        await go_on.wait()
        await resp.write(b"later")
        await resp.write_eof()
        return resp

    port = await serve(handler)
    async with aiohttp.ClientSession() as s:
        async with asyncio.timeout(5):  # the head arrives before any body byte is written
            r = await s.get(f"http://127.0.0.1:{port}/")
        assert r.status == 200
        go_on.set()
        assert await r.read() == b"later"


async def test_send_continue_reaches_the_client_before_the_response(
        serve: Callable[[Handler], Awaitable[int]]) -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        await send_continue(request)
        return web.Response(body=await request.read())

    port = await serve(handler)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                     b"Content-Length: 4\r\n\r\n")
        async with asyncio.timeout(5):
            assert await reader.readexactly(len(CONTINUE)) == CONTINUE
            writer.write(b"body")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK")
            assert await reader.readexactly(4) == b"body"
    finally:
        writer.close()


async def test_cut_connection_flushes_what_was_written_and_the_client_sees_an_error(
        serve: Callable[[Handler], Awaitable[int]]) -> None:
    finished = asyncio.Event()

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"part one,")
        cut_connection(request)
        finished.set()
        return resp  # aiohttp's write_eof on the closed transport must not raise

    port = await serve(handler)
    got = b""
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/") as r:
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in r.content.iter_any():
                got += chunk
    assert got == b"part one,"
    await asyncio.wait_for(finished.wait(), 5)
