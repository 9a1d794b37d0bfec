"""A lean HTTP/1.1 client for the worker -> LLM server hop, with a keep-alive pool.

The worker talks to exactly one upstream (``base_url``), so aiohttp's general
client (cookie jars, redirects, URL building, a task and a stream reader per
request) cost about a third of the worker's CPU for features this hop never
uses. This client writes the request head and a known body in one write,
parses the answer head itself and hands body bytes on as they arrive: what
one read of the socket brought comes out of ``Answer.read`` as one piece
(whole chunks of a chunked body, already decoded), so a token stream is
forwarded chunk by chunk with no extra wake-ups.

Covered: ``http://`` and ``https://`` (the same protocol over asyncio's TLS
transport), bodies framed by ``Content-Length``, chunked transfer-encoding and
read-until-close, ``HEAD``/``204``/``304`` without a body, interim ``1xx``
answers (skipped), request bodies as bytes or streamed (chunked when their
length is unknown). Nothing here needs aiohttp's client as a fallback: the
cases it would cover never reach this hop (``Expect`` and ``Upgrade`` are
hop-by-hop headers, dropped before the request is made).

A connection goes back to the pool the moment its answer is complete (the
rest of the body waits in the ``Answer``); an answer dropped unfinished
aborts its connection, so the LLM server stops generating.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterable
from typing import Final, cast

from yarl import URL

MAX_HEAD: Final = 64 * 1024  # an answer head larger than this is refused
HIGH_WATER: Final = 4 * 1024 * 1024  # buffered body bytes before reading pauses
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)
_NO_BODY_STATUS: Final = frozenset({204, 304})

Body = bytes | AsyncIterable[bytes] | None


class UpstreamError(OSError):
    """The upstream could not be reached, or broke the answer (an ``OSError`` like the rest)."""


class Answer:
    """An upstream answer: its head, and its body as it arrives."""

    __slots__ = ("status", "reason", "headers", "content_length", "_conn", "_chunks",
                 "_buffered", "_waiter", "_done", "_error", "_paused")

    def __init__(self, conn: _Conn, status: int, reason: str,
                 headers: list[tuple[str, str]], content_length: int | None) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content_length = content_length  # of the body when framed by Content-Length
        self._conn: _Conn | None = conn  # None once the body is complete (or dropped)
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._done = False
        self._error: UpstreamError | None = None
        self._paused = False

    @property
    def complete(self) -> bool:
        """The whole body has arrived (it may still be waiting to be read)."""
        return self._done

    async def read(self) -> bytes:
        """What has arrived since the last read (at least one byte); b"" at the end.

        Returns at once, without a loop turn, when something is buffered.
        Raises ``UpstreamError`` when the upstream broke the answer.
        """
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._paused and self._conn is not None:
            self._paused = False
            self._conn.resume()
        return data

    async def read_all(self) -> bytes:
        parts = []
        while chunk := await self.read():
            parts.append(chunk)
        return b"".join(parts)

    def close(self) -> None:
        """Done with it: an unfinished answer aborts its connection."""
        conn, self._conn = self._conn, None
        if conn is not None and not self._done:
            conn.abort()

    # ---- fed by the connection -------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and not self._paused and self._conn is not None:
            self._paused = True
            self._conn.pause()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _end(self, error: UpstreamError | None = None) -> None:
        if self._done or self._error is not None:
            return
        if error is None:
            self._done = True
        else:
            self._error = error
        self._conn = None
        self._wake()


class _Conn(asyncio.Protocol):
    """One keep-alive connection: writes requests, parses answers."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.reusable = True
        self.got_bytes = False  # any byte of the current answer arrived
        self.no_body = False  # the current request is HEAD
        self.head_waiter: asyncio.Future[Answer] | None = None
        self.answer: Answer | None = None
        self._state = _DONE
        self._pending = b""
        self._left = 0
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False

    # ---- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        if self._state == _UNTIL_CLOSE and exc is None:
            self._finish()
        else:
            self._fail(f"the upstream closed the connection{f': {exc!r}' if exc else ''}")
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_exception(UpstreamError("the upstream closed the connection"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        if self._pending:
            data, self._pending = self._pending + data, b""
        end = len(data)
        pos = 0
        answer = self.answer
        fed = False
        while pos < end:
            state = self._state
            if state == _LENGTH or state == _CHUNK_DATA:
                n = min(self._left, end - pos)
                assert answer is not None
                answer._feed(data[pos:pos + n] if (pos or n < end) else data)
                fed = True
                pos += n
                self._left -= n
                if not self._left:
                    if state == _LENGTH:
                        self._finish()
                        answer = None
                    else:
                        self._state = _CHUNK_CRLF
            elif state == _CHUNK_SIZE:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    break
                try:
                    size = int(data[pos:eol].split(b";", 1)[0], 16)
                except ValueError:
                    return self._fail("the upstream sent a bad chunk size")
                if size < 0:
                    return self._fail("the upstream sent a bad chunk size")
                pos = eol + 2
                if size:
                    self._state, self._left = _CHUNK_DATA, size
                else:
                    self._state = _TRAILERS
            elif state == _CHUNK_CRLF:
                if end - pos < 2:
                    break
                if data[pos:pos + 2] != b"\r\n":
                    return self._fail("the upstream sent a chunk without its CRLF")
                pos += 2
                self._state = _CHUNK_SIZE
            elif state == _TRAILERS:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    break
                if eol == pos:
                    self._finish()
                    answer = None
                pos = eol + 2  # a trailer line: dropped (trailers are hop-by-hop here)
            elif state == _UNTIL_CLOSE:
                assert answer is not None
                answer._feed(data[pos:] if pos else data)
                fed = True
                pos = end
            elif state == _HEAD:
                eoh = data.find(b"\r\n\r\n", pos)
                if eoh < 0:
                    if end - pos > MAX_HEAD:
                        return self._fail("the upstream's answer head is too large")
                    break
                if not self._head(data[pos:eoh]):
                    return
                pos = eoh + 4
                answer = self.answer
            else:  # bytes nobody asked for: the connection cannot be trusted again
                self.reusable = False
                self.abort()
                return
        if pos < end:
            self._pending = data[pos:]
        if fed and answer is not None:
            answer._wake()

    # ---- parsing ---------------------------------------------------------------------

    def _head(self, raw: bytes) -> bool:
        lines = raw.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
            self._fail(f"the upstream sent no HTTP/1.x answer: {lines[0][:80]!r}")
            return False
        status = int(code)
        headers: list[tuple[str, str]] = []
        length: str | None = None
        chunked = False
        keep_alive = version == "HTTP/1.1"
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name[-1] in " \t" or name[0] in " \t":
                self._fail(f"the upstream sent a bad header line: {line[:80]!r}")
                return False
            value = value.strip()
            headers.append((name, value))
            low = name.lower()
            if low == "content-length":
                if length is not None and length != value:
                    self._fail("the upstream sent conflicting Content-Length headers")
                    return False
                length = value
            elif low == "transfer-encoding":
                chunked = value.lower().rsplit(",", 1)[-1].strip() == "chunked"
                if not chunked:
                    keep_alive = False
            elif low == "connection":
                tokens = {t.strip().lower() for t in value.split(",")}
                if "close" in tokens:
                    keep_alive = False
                elif "keep-alive" in tokens:
                    keep_alive = True
        if 100 <= status < 200 and status != 101:
            return True  # interim answer (103 Early Hints, ...): the real one follows
        if not keep_alive:
            self.reusable = False
        size: int | None = None
        if self.no_body or status in _NO_BODY_STATUS or status == 101:
            self._state = _DONE
            if status == 101:
                self.reusable = False
        elif chunked:
            self._state = _CHUNK_SIZE
            if length is not None:  # both framings: a smuggling risk, not worth reusing
                self.reusable = False
        elif length is not None:
            if not length.isdigit():
                self._fail(f"the upstream sent a bad Content-Length: {length[:40]!r}")
                return False
            size = int(length)
            self._state, self._left = (_LENGTH, size) if size else (_DONE, 0)
        else:
            self._state = _UNTIL_CLOSE
            self.reusable = False
        answer = self.answer = Answer(self, status, reason, headers, size)
        waiter = self.head_waiter
        self.head_waiter = None
        if self._state == _DONE:
            self._finish()
        if waiter is not None and not waiter.done():
            waiter.set_result(answer)
        return True

    def _finish(self) -> None:
        answer, self.answer = self.answer, None
        self._state = _DONE
        if answer is not None:
            if answer._paused:  # the rest is buffered: the next answer must be read
                answer._paused = False
                self.resume()
            answer._end()
        if self.reusable and not self.closed and not self._pending:
            self.pool._release(self)
        else:
            self.abort()

    def _fail(self, message: str) -> None:
        self.reusable = False
        error = UpstreamError(message)
        waiter, self.head_waiter = self.head_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        answer, self.answer = self.answer, None
        if answer is not None:
            answer._end(error)
        self._state = _DONE
        self.abort()

    # ---- used by the pool ------------------------------------------------------------

    def start(self, head: bytes, no_body: bool) -> asyncio.Future[Answer]:
        """Send a request head (with its body when known); the future gets the answer."""
        assert self.transport is not None
        self.got_bytes = False
        self.no_body = no_body
        self._state = _HEAD
        self._pending = b""
        waiter = self.head_waiter = asyncio.get_running_loop().create_future()
        self.transport.write(head)
        return waiter

    async def write(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            raise UpstreamError("the upstream closed the connection")
        self.transport.write(data)
        if self._write_paused:
            self._drain = asyncio.get_running_loop().create_future()
            try:
                await self._drain
            finally:
                self._drain = None

    def pause(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def abort(self) -> None:
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.transport.abort()


class UpstreamPool:
    """Keep-alive connections to one upstream; ``request`` sends one exchange."""

    def __init__(self, base_url: str, connect_timeout: float = 10.0,
                 idle_timeout: float = 30.0, ssl_context: ssl.SSLContext | None = None) -> None:
        """``ssl_context``: for ``https://`` (default: the system's trusted CAs)."""
        url = URL(base_url)
        # a bad base_url fails each request (a 502 that names it), as aiohttp's client did,
        # rather than the worker
        self.invalid = ("" if url.scheme in ("http", "https") and url.raw_host else
                        f"base_url must be http(s)://host[:port][/path], not {base_url!r}")
        self.base_url = base_url
        self.host = url.raw_host or ""
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.prefix = url.raw_path.rstrip("/")
        self.ssl: ssl.SSLContext | None = None
        if url.scheme == "https":
            self.ssl = ssl_context or ssl.create_default_context()
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if url.is_default_port() else f"{host}:{self.port}"
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self._idle: list[_Conn] = []
        self._all: set[_Conn] = set()

    async def request(self, method: str, target: str, headers: list[tuple[str, str]],
                      body: Body = None) -> Answer:
        """Send ``method target`` (the raw path and query; ``base_url``'s path goes first).

        ``headers`` are sent as given, but for framing: ``Host`` is the
        upstream's, and a bytes body gets its ``Content-Length`` (a streamed
        one keeps the client's, else goes chunked). Raises ``UpstreamError``
        (or another ``OSError``) when no answer head arrives.
        """
        if self.invalid:
            raise UpstreamError(self.invalid)
        streamed = body is not None and not isinstance(body, bytes)
        head = self._head(method, target, headers, body, streamed)
        if not streamed and body:
            assert isinstance(body, bytes)
            head += body  # one write: head and body
        while True:
            conn, reused = await self._acquire()
            waiter = conn.start(head, method == "HEAD")
            sending = None
            if streamed:
                assert body is not None and not isinstance(body, bytes)
                conn.reusable = False  # the answer may come before the body is all sent
                sending = asyncio.ensure_future(_send_body(conn, body, _has_length(headers)))
            try:
                return await waiter
            except UpstreamError:
                if reused and not conn.got_bytes and not streamed:
                    continue  # a keep-alive connection the upstream had just closed: retry
                raise
            except BaseException:
                conn.abort()
                raise
            finally:
                if sending is not None and not sending.done():
                    if conn.closed or waiter.cancelled() or waiter.exception() is not None:
                        sending.cancel()
                    else:  # the answer began before the body was all sent: go on sending
                        sending.add_done_callback(_consume)

    async def close(self) -> None:
        for conn in list(self._all):
            conn.abort()
        self._all.clear()
        self._idle.clear()

    def _head(self, method: str, target: str, headers: list[tuple[str, str]], body: Body,
              streamed: bool) -> bytes:
        parts = [f"{method} {self.prefix}{target} HTTP/1.1\r\nHost: {self.host_header}\r\n"]
        for name, value in headers:
            low = name.lower()
            if low == "host" or (low == "content-length" and not streamed):
                continue
            parts.append(f"{name}: {value}\r\n")
        if streamed:
            if not _has_length(headers):
                parts.append("Transfer-Encoding: chunked\r\n")
        elif body or method not in ("GET", "HEAD", "OPTIONS", "DELETE", "TRACE"):
            parts.append(f"Content-Length: {len(body) if isinstance(body, bytes) else 0}\r\n")
        parts.append("\r\n")
        return "".join(parts).encode("latin-1")

    async def _acquire(self) -> tuple[_Conn, bool]:
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < self.idle_timeout:
                return conn, True
            conn.abort()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Conn(self), self.host, self.port, ssl=self.ssl)
        except TimeoutError:
            raise UpstreamError(f"connecting to {self.base_url} timed out after "
                                f"{self.connect_timeout:g}s") from None
        self._all.add(conn)
        return conn, False

    def _release(self, conn: _Conn) -> None:
        conn.idle_since = asyncio.get_running_loop().time()
        self._idle.append(conn)

    def _forget(self, conn: _Conn) -> None:
        self._all.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)


def _has_length(headers: list[tuple[str, str]]) -> bool:
    return any(name.lower() == "content-length" for name, _ in headers)


async def _send_body(conn: _Conn, body: AsyncIterable[bytes], has_length: bool) -> None:
    """A streamed request body; chunked unless the client's Content-Length frames it."""
    try:
        async for chunk in body:
            if chunk:
                await conn.write(chunk if has_length
                                 else b"%x\r\n%b\r\n" % (len(chunk), chunk))
        if not has_length:
            await conn.write(b"0\r\n\r\n")
    except BaseException:  # the upstream or the body's source (the client) went away
        conn.abort()
        raise


def _consume(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()
