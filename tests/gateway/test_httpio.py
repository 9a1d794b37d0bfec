"""read_body against a real server socket: whole, too large, and cut short."""

from __future__ import annotations

import asyncio

from aiohttp import web

from spirit_gpu.gateway.httpio import ApiError, read_body


async def test_read_body_whole_too_large_and_cut_short() -> None:
    outcomes: asyncio.Queue[bytes | str] = asyncio.Queue()

    async def handler(request: web.Request) -> web.Response:
        try:
            outcomes.put_nowait(await read_body(request, 100))
        except ApiError as exc:
            outcomes.put_nowait(f"{exc.status} {exc.message}")
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]

    async def send(raw: bytes) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        await writer.drain()
        writer.write_eof()
        await reader.read()
        writer.close()

    head = b"POST / HTTP/1.1\r\nHost: x\r\n"
    try:
        await send(head + b"Content-Length: 3\r\n\r\nabc")
        assert await asyncio.wait_for(outcomes.get(), 10) == b"abc"
        await send(head + b"Content-Length: 0\r\n\r\n")
        assert await asyncio.wait_for(outcomes.get(), 10) == b""
        await send(head + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        assert await asyncio.wait_for(outcomes.get(), 10) == b"abcde"
        await send(head + b"Content-Length: 101\r\n\r\n" + b"x" * 101)
        assert await asyncio.wait_for(outcomes.get(), 10) == (
            "400 body too large: the limit is 100 bytes")
        chunked = b"Transfer-Encoding: chunked\r\n\r\n65\r\n" + b"x" * 101 + b"\r\n0\r\n\r\n"
        await send(head + chunked)
        assert await asyncio.wait_for(outcomes.get(), 10) == (
            "400 body too large: the limit is 100 bytes")
        # the client stops after 12 of the 50 bytes it announced
        await send(head + b"Content-Length: 50\r\n\r\n" + b'{"input": 1}')
        outcome = await asyncio.wait_for(outcomes.get(), 10)
        assert isinstance(outcome, str) and outcome.startswith("400 failed to get request data")
    finally:
        await runner.cleanup()
