"""The worker's lean HTTP/1.1 client against real sockets: scripted raw servers and aiohttp.

Each test runs on asyncio's loop and on uvloop (what workers run; their transports
differ): see ``pytest_asyncio_loop_factories`` in this folder's conftest.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from spirit_gpu.supervisor.proxy.upstream import (
    MAX_HEAD,
    Answer,
    InvalidRequest,
    UpstreamError,
    UpstreamPool,
)

Script = Callable[["RawServer", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RawServer:
    """A TCP server that answers each request with what a test's script writes."""

    script: Script
    url: str = ""
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                body = b""
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        body = await reader.readexactly(int(line.split(b":")[1]))
                    elif line.lower() == b"transfer-encoding: chunked":
                        body = await _read_chunked(reader)
                self.requests.append(head + body)
                await self.script(self, reader, writer)
                if writer.is_closing():
                    return
        finally:
            writer.close()


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    out = b""
    while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
        out += await reader.readexactly(size)
        await reader.readexactly(2)
    await reader.readexactly(2)
    return out


@pytest.fixture
async def raw() -> AsyncIterator[Callable[[Script], Awaitable[RawServer]]]:
    servers: list[asyncio.Server] = []

    async def make(script: Script) -> RawServer:
        raw = RawServer(script)
        server = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
        servers.append(server)
        raw.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        return raw

    yield make
    for server in servers:
        server.close()


async def read_pieces(answer: Answer) -> list[bytes]:
    pieces = []
    while piece := await answer.read():
        pieces.append(piece)
    return pieces


async def test_content_length_answers_reuse_one_connection(
        raw: Callable[[Script], Awaitable[RawServer]]) -> None:
    async def script(_: RawServer, __: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Up: 1\r\n"
                b"Content-Length: 11\r\n\r\n{\"ok\": 1}\r\n")

    server = await raw(script)
    pool = UpstreamPool(server.url + "/prefix/")
    try:
        for i in range(3):
            answer = await pool.request("POST", f"/v1/x?i={i}", [("X-Client", "c")], b"hello")
            assert (answer.status, answer.reason) == (200, "OK")
            assert ("X-Up", "1") in answer.headers and answer.content_length == 11
            assert await answer.read_all() == b'{"ok": 1}\r\n'
            answer.close()
    finally:
        await pool.close()
    assert server.connections == 1  # keep-alive: one connection for all three
    first = server.requests[0].decode()
    assert first.startswith("POST /prefix/v1/x?i=0 HTTP/1.1\r\n")
    assert f"Host: {server.url[7:]}\r\n" in first and "X-Client: c\r\n" in first
    assert first.endswith("Content-Length: 5\r\n\r\nhello")


async def test_chunked_answer_is_decoded_and_passed_on_as_it_arrives(
        raw: Callable[[Script], Awaitable[RawServer]]) -> None:
    go_on = asyncio.Event()

    async def script(_: RawServer, __: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"6;ext=1\r\ntoken1\r\n")
        await go_on.wait()
        for part in (b"6\r\ntok", b"en2\r", b"\n", b"0\r\nX-Trailer: t\r\n\r\n"):
            w.write(part)
            await w.drain()
            await asyncio.sleep(0.01)

    server = await raw(script)
    pool = UpstreamPool(server.url)
    try:
        answer = await pool.request("GET", "/stream", [], None)
        assert await answer.read() == b"token1"  # before the rest was written
        go_on.set()
        assert b"".join(await read_pieces(answer)) == b"token2"
        assert answer.complete
        again = await pool.request("GET", "/stream", [], None)  # reused after the trailer
        assert await again.read_all() == b"token1token2"
    finally:
        await pool.close()
    assert server.connections == 1
    assert b"Content-Length" not in server.requests[0]  # a GET without a body


async def test_answer_until_close(raw: Callable[[Script], Awaitable[RawServer]]) -> None:
    async def script(_: RawServer, __: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it ")
        await w.drain()
        w.write(b"until close")
        w.close()

    server = await raw(script)
    pool = UpstreamPool(server.url)
    try:
        for _ in range(2):
            answer = await pool.request("GET", "/", [], None)
            assert answer.content_length is None
            assert await answer.read_all() == b"all of it until close"
    finally:
        await pool.close()
    assert server.connections == 2  # such a connection is never reused


async def test_upstream_closing_mid_answer_is_an_error(
        raw: Callable[[Script], Awaitable[RawServer]]) -> None:
    async def script(_: RawServer, __: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await w.drain()
        w.close()

    async def chunked(_: RawServer, __: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\npart\r\n")
        await w.drain()
        w.close()

    for s in (script, chunked):
        server = await raw(s)
        pool = UpstreamPool(server.url)
        try:
            answer = await pool.request("GET", "/", [], None)
            assert await answer.read() == (b"only part" if s is script else b"part")
            with pytest.raises(UpstreamError, match="closed the connection"):
                await answer.read()
        finally:
            await pool.close()


async def test_head_204_and_interim_answers_have_no_body(
        raw: Callable[[Script], Awaitable[RawServer]]) -> None:
    async def script(server: RawServer, _: asyncio.StreamReader,
                     w: asyncio.StreamWriter) -> None:
        if server.requests[-1].startswith(b"HEAD"):
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n")
        elif server.requests[-1].startswith(b"GET"):
            w.write(b"HTTP/1.1 304 Not Modified\r\nETag: \"e\"\r\nContent-Length: 7\r\n\r\n")
        else:
            w.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                    b"HTTP/1.1 204 No Content\r\n\r\n")

    server = await raw(script)
    pool = UpstreamPool(server.url)
    try:
        head = await pool.request("HEAD", "/", [], None)
        assert head.status == 200 and ("Content-Length", "42") in head.headers
        assert await head.read() == b""
        empty = await pool.request("DELETE", "/", [], None)
        assert empty.status == 204 and await empty.read() == b""
        cached = await pool.request("GET", "/", [("If-None-Match", '"e"')], None)
        assert cached.status == 304 and await cached.read() == b""
        again = await pool.request("HEAD", "/", [], None)  # the connection is still in step
        assert again.status == 200 and await again.read() == b""
    finally:
        await pool.close()
    assert server.connections == 1


async def test_upstream_down_raises_an_os_error() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    pool = UpstreamPool(dead)
    with pytest.raises(OSError):
        await pool.request("GET", "/", [], None)
    await pool.close()


async def test_stale_keep_alive_connection_is_retried(
        raw: Callable[[Script], Awaitable[RawServer]]) -> None:
    async def script(server: RawServer, _: asyncio.StreamReader,
                     w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()
        if len(server.requests) == 1:
            w.close()  # closes its side of the keep-alive connection right after

    server = await raw(script)
    pool = UpstreamPool(server.url)
    try:
        first = await pool.request("POST", "/", [], b"1")
        assert await first.read_all() == b"ok"
        await asyncio.sleep(0.05)
        second = await pool.request("POST", "/", [], b"2")
        assert await second.read_all() == b"ok"
    finally:
        await pool.close()
    assert server.connections == 2


async def test_dropping_an_unfinished_answer_aborts_the_upstream(
        raw: Callable[[Script], Awaitable[RawServer]]) -> None:
    closed = asyncio.Event()

    async def script(_: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
        await w.drain()
        assert await r.read() == b""  # the client closed its end
        closed.set()

    server = await raw(script)
    pool = UpstreamPool(server.url)
    try:
        answer = await pool.request("GET", "/", [], None)
        assert await answer.read() == b"a"
        answer.close()
        await asyncio.wait_for(closed.wait(), 5)
    finally:
        await pool.close()


async def test_streamed_request_bodies(raw: Callable[[Script], Awaitable[RawServer]]) -> None:
    async def script(server: RawServer, _: asyncio.StreamReader,
                     w: asyncio.StreamWriter) -> None:
        size = len(server.requests[-1].split(b"\r\n\r\n", 1)[1])
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%d" % (len(str(size)), size))

    async def body() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b"x" * 65536

    server = await raw(script)
    pool = UpstreamPool(server.url)
    try:
        unknown = await pool.request("POST", "/", [], body())
        assert await unknown.read_all() == str(40 * 65536).encode()
        known = await pool.request("POST", "/", [("Content-Length", str(40 * 65536))], body())
        assert await known.read_all() == str(40 * 65536).encode()
    finally:
        await pool.close()
    assert b"Transfer-Encoding: chunked" in server.requests[0]
    assert b"Transfer-Encoding" not in server.requests[1].split(b"\r\n\r\n")[0]


async def test_against_aiohttp_a_large_answer_and_a_stream() -> None:
    big = bytes(range(256)) * 40_000  # 10 MB: more than the read-pause threshold

    async def large(request: web.Request) -> web.Response:
        return web.Response(body=big)

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for i in range(5):
            await resp.write(b"line %d\n" % i)
            await asyncio.sleep(0.005)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/large", large)
    app.router.add_get("/stream", stream)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    pool = UpstreamPool(str(server.make_url("")))
    try:
        answer = await pool.request("GET", "/large", [], None)
        await asyncio.sleep(0.2)  # let the buffer fill past the pause threshold
        assert await answer.read_all() == big
        streamed = await pool.request("GET", "/stream", [], None)
        pieces = await read_pieces(streamed)
        assert b"".join(pieces) == b"".join(b"line %d\n" % i for i in range(5))
        assert len(pieces) >= 3  # handed on as the lines arrived, not at the end
        again = await pool.request("GET", "/large", [], None)
        assert len(await again.read_all()) == len(big)
    finally:
        await pool.close()
        await server.close()


async def test_a_base_url_that_is_not_http_fails_each_request() -> None:
    pool = UpstreamPool("localhost:11434")  # no scheme
    with pytest.raises(UpstreamError, match="base_url must be http"):
        await pool.request("GET", "/", [], None)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost, and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


async def test_https(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"hello over {request.scheme}")

    app = web.Application()
    app.router.add_get("/hello", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = runner.addresses[0][1]
    pool = UpstreamPool(f"https://localhost:{port}",
                        ssl_context=ssl.create_default_context(cafile=str(cert)))
    try:
        for _ in range(2):
            answer = await pool.request("GET", "/hello", [], None)
            assert await answer.read_all() == b"hello over https"
        untrusted = UpstreamPool(f"https://localhost:{port}")  # the system's CAs only
        with pytest.raises(ssl.SSLError):
            await untrusted.request("GET", "/hello", [], None)
    finally:
        await pool.close()
        await runner.cleanup()


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnope\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length: x1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Header: 1\r\n\r\n",
    b"SPDY/9 200 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Big: " + b"h" * MAX_HEAD,
], ids=["bad-chunk-size", "two-lengths", "bad-length", "bad-header", "not-http", "huge-head"])
async def test_malformed_answers_are_errors_and_the_connection_is_dropped(
        raw: Callable[[Script], Awaitable[RawServer]], answer: bytes) -> None:
    async def script(_: RawServer, __: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(answer)
        await w.drain()

    server = await raw(script)
    pool = UpstreamPool(server.url)
    try:
        with pytest.raises(UpstreamError, match="malformed|too large"):
            got = await pool.request("GET", "/", [], None)
            await got.read_all()
        assert pool._idle == []  # never reused
    finally:
        await pool.close()


async def test_bytes_after_a_whole_answer_keep_it_but_drop_the_connection(
        raw: Callable[[Script], Awaitable[RawServer]]) -> None:
    async def script(_: RawServer, __: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra")

    server = await raw(script)
    pool = UpstreamPool(server.url)
    try:
        for _ in range(2):
            answer = await pool.request("GET", "/", [], None)
            assert await answer.read_all() == b"ok"
    finally:
        await pool.close()
    assert server.connections == 2


async def test_a_header_outside_latin1_is_refused_before_anything_is_sent(
        raw: Callable[[Script], Awaitable[RawServer]]) -> None:
    async def script(_: RawServer, __: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    server = await raw(script)
    pool = UpstreamPool(server.url)
    try:
        with pytest.raises(InvalidRequest, match="'X-Name' has a character outside Latin-1"):
            await pool.request("GET", "/", [("X-Name", "caf\u00e9 \u20ac")], None)
        answer = await pool.request("GET", "/", [("X-Name", "caf\u00e9")], None)  # Latin-1
        assert await answer.read_all() == b"ok"
    finally:
        await pool.close()
    assert server.requests[0].count(b"caf\xe9") == 1
