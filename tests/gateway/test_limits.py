"""Connection limits of a served gateway (conn_guard), with real sockets on 127.0.0.1:
head and body deadlines, the connection cap, the open-file limit."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import aiohttp
import pytest

from tests.gateway.conftest import AUTH
from tests.gateway.serving import Served, closed_by_peer

HEAD = 0.5


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def test_a_silent_connection_is_closed_after_the_head_timeout(served: Served) -> None:
    port = await served(head_timeout=HEAD)
    reader, writer = await connect(port)
    opened = time.monotonic()
    assert await closed_by_peer(reader) == b""
    assert time.monotonic() - opened >= HEAD * 0.9
    writer.close()


async def test_a_head_sent_a_byte_at_a_time_is_cut(served: Served) -> None:
    port = await served(head_timeout=HEAD)
    reader, writer = await connect(port)
    opened = time.monotonic()
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000

    async def trickle() -> None:
        for byte in head:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.02)

    sender = asyncio.create_task(trickle())
    try:
        assert await closed_by_peer(reader) == b""  # no answer: the head never completed
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
    assert HEAD * 0.9 <= time.monotonic() - opened < 10
    writer.close()


async def test_keep_alive_gets_a_fresh_head_timeout_after_each_response(served: Served) -> None:
    port = await served(head_timeout=HEAD)
    reader, writer = await connect(port)
    for _ in range(3):  # each request within the timeout, together longer than it
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        await asyncio.sleep(HEAD * 0.6)
    answered = time.monotonic()
    assert await closed_by_peer(reader) == b""  # then idle: closed
    assert time.monotonic() - answered >= HEAD * 0.3
    writer.close()


async def test_a_running_handler_is_not_cut(served: Served) -> None:
    """An open worker link (a handler that runs for as long as the link lives) stays."""
    port = await served(head_timeout=HEAD)
    async with aiohttp.ClientSession() as session, \
            session.ws_connect(f"http://127.0.0.1:{port}/agent/s/apis/v1/link") as ws:
        await ws.receive_bytes(timeout=5)  # Welcome
        await asyncio.sleep(HEAD * 4)
        assert not ws.closed
        await ws.send_bytes(b"\x91\xa6credit")  # malformed (no n): the link answers by closing
        msg = await ws.receive(timeout=5)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)


async def test_a_slow_body_gets_408_and_the_connection_closes(served: Served) -> None:
    port = await served(head_timeout=30, body_timeout=HEAD)
    reader, writer = await connect(port)
    writer.write(b"POST /v1/s/sync HTTP/1.1\r\nHost: x\r\nAuthorization: " +
                 AUTH["Authorization"].encode() + b"\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"input\":")
    started = time.monotonic()
    answer = await closed_by_peer(reader)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"the body did not arrive within 0.5 s" in answer
    assert HEAD * 0.9 <= time.monotonic() - started < 10
    writer.close()


async def test_connections_past_the_cap_are_closed_and_logged_once(
        served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    port = await served(head_timeout=30, max_connections=4)
    held = [await connect(port) for _ in range(3)]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
            assert resp.status == 200  # the fourth connection
        extra = [await connect(port) for _ in range(3)]
        # the session keeps its connection: 4 open, so these three are refused
        for reader, _ in extra:
            assert await closed_by_peer(reader, 5) == b""
        out = capsys.readouterr().out
        assert out.count("connection cap reached") == 1, out
        assert "the limit is 4" in out
        for _, writer in held + extra:
            writer.close()

        async def healthy() -> bool:
            try:
                async with session.get(f"http://127.0.0.1:{port}/healthz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False
        deadline = time.monotonic() + 10
        while not await healthy():
            assert time.monotonic() < deadline, "never accepted again"
            await asyncio.sleep(0.05)
    out = capsys.readouterr().out
    assert "3 were refused while at the cap" in out, out


def test_the_soft_open_file_limit_is_raised_to_the_hard_one() -> None:
    code = (
        "import resource\n"
        "from spirit_gpu.gateway.conn_guard import connection_cap, raise_fd_limit\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (min(512, hard), hard))\n"
        "now = raise_fd_limit()\n"
        "assert now == resource.getrlimit(resource.RLIMIT_NOFILE)[0]\n"
        "print(now == hard or hard == resource.RLIM_INFINITY, connection_cap(10000, 1024))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.split() == ["True", "768"]


async def test_the_head_timeout_follows_a_request_under_a_longer_body_timeout(
        served: Served) -> None:
    port = await served(head_timeout=HEAD, body_timeout=30)
    reader, writer = await connect(port)
    writer.write(b"POST /v1/s/status HTTP/1.1\r\nHost: x\r\nAuthorization: " +
                 AUTH["Authorization"].encode() + b"\r\nContent-Length: 20\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.1)  # the head alone: the handler waits for the body
    writer.write(b'{"requestIDs": [] }\n')
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    answered = time.monotonic()
    await closed_by_peer(reader)
    assert time.monotonic() - answered < 10  # the head timeout, not the body's 30 s
    writer.close()
