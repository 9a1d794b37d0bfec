"""A lean HTTP/1.1 client for the worker -> LLM server hop, with a keep-alive pool.

The worker talks to exactly one upstream (``base_url``), so aiohttp's general
client (cookie jars, redirects, URL building, a task and a stream reader per
request) cost about a third of the worker's CPU for features this hop never
uses. This client writes the request head and a known body in one write,
parses the answer with llhttp (``httptools``, the parser uvicorn uses) and
hands body bytes on as they arrive: what one read of the socket brought comes
out of ``Answer.read`` as one piece (whole chunks of a chunked body, already
decoded), so a token stream is forwarded chunk by chunk with no extra
wake-ups.

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

import httptools
from yarl import URL

MAX_HEAD: Final = 64 * 1024  # an answer head larger than this is refused
HIGH_WATER: Final = 4 * 1024 * 1024  # buffered body bytes before reading pauses
_NO_BODY_STATUS: Final = frozenset({204, 304})

Body = bytes | AsyncIterable[bytes] | None


class UpstreamError(OSError):
    """The upstream could not be reached, or broke the answer (an ``OSError`` like the rest)."""


class InvalidRequest(ValueError):
    """The request cannot be written as HTTP/1.1 (nothing was sent): the client's fault."""


class _HeadAnswered(Exception):
    """Raised from a parser callback to stop llhttp after the head of an answer to HEAD."""


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

    @property
    def pending(self) -> bool:
        """Body bytes are buffered: ``read`` returns them without waiting."""
        return bool(self._chunks)

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
    """One keep-alive connection: writes requests; llhttp (``httptools``) parses answers.

    The parser calls back as it recognises the answer: ``on_header`` for each
    header line, ``on_headers_complete`` when the head is whole (the ``Answer``
    is made then), ``on_body`` with each piece of decoded body, and
    ``on_message_complete`` at its end. Our own code keeps only the decisions
    llhttp cannot make: the answer to a ``HEAD`` has no body (httptools gives no
    way to tell llhttp), a body read until close ends well when the connection
    closes cleanly, and the connection is reused only when llhttp says the
    answer allows it and nothing unasked-for arrived.
    """

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
        self._parser = httptools.HttpResponseParser(self)
        self._waiting = False  # a request is out and its final answer not yet complete
        self._head_bytes = 0
        self._reason = ""
        self._headers: list[tuple[str, str]] = []
        self._length: int | None = None
        self._framed = False  # Content-Length or chunked: not read until close
        self._complete = False
        self._fed = False
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False

    # ---- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        if self.answer is not None and not self._framed and exc is None:
            self._finish()  # a body read until close: the close is its end
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
        if not self._waiting:  # bytes nobody asked for: the connection cannot be trusted
            self.abort()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # 101: the rest is another protocol
            self.reusable = False
            self._complete = True
        except httptools.HttpParserError as exc:
            if self._complete:  # bytes after a whole answer: it stands, the connection not
                self.reusable = False
            elif self.no_body and self.answer is not None:
                # the head of an answer to HEAD: llhttp stopped where it expected a body;
                # a fresh parser for the next answer, if nothing came after this head
                self._parser = httptools.HttpResponseParser(self)
                self.reusable = self.reusable and data.endswith(b"\r\n\r\n")
                self._complete = True
            else:
                self._fail(f"the upstream sent a malformed answer: {exc}")
                return
        answer = self.answer
        if answer is None and self._waiting:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:  # llhttp sets no limit of its own
                self._fail("the upstream's answer head is too large")
                return
        if self._fed and answer is not None:
            self._fed = False
            answer._wake()
        if self._complete:
            self._finish()

    # ---- httptools callbacks ---------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:  # a second answer to one request
            raise UpstreamError("the upstream sent an answer nobody asked for")
        self._headers = []
        self._length = None
        self._framed = False

    def on_status(self, reason: bytes) -> None:
        self._reason = reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.answer is not None:
            return  # a chunked body's trailer: hop-by-hop here, dropped
        key = name.decode("latin-1")
        text = value.decode("latin-1")
        self._headers.append((key, text))
        if len(name) == 14 and key.lower() == "content-length":
            self._length = int(text)  # llhttp has checked it: digits, given once
            self._framed = True
        elif len(name) == 17 and key.lower() == "transfer-encoding":
            # chunked last: framed; anything else is read until close (RFC 9112 6.3)
            self._framed = text.rstrip().lower().endswith("chunked")

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            return  # interim answer (103 Early Hints, ...): the real one follows
        if not parser.should_keep_alive():
            self.reusable = False
        no_body = self.no_body or status in _NO_BODY_STATUS or status == 101
        length = None if no_body else self._length
        answer = self.answer = Answer(self, status, self._reason, self._headers, length)
        waiter, self.head_waiter = self.head_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(answer)
        if self.no_body:
            raise _HeadAnswered  # stops llhttp, which would wait for a body (see data_received)

    def on_body(self, data: bytes) -> None:
        answer = self.answer
        if answer is not None:
            answer._feed(data)
            self._fed = True

    def on_message_complete(self) -> None:
        if self.answer is not None:  # not an interim answer's end
            self._complete = True

    # ---- ends of an answer -----------------------------------------------------------

    def _finish(self) -> None:
        answer, self.answer = self.answer, None
        self._waiting = self._complete = False
        if answer is not None:
            if answer._paused:  # the rest is buffered: the next answer must be read
                answer._paused = False
                self.resume()
            answer._end()
        if self.reusable and not self.closed:
            self.pool._release(self)
        else:
            self.abort()

    def _fail(self, message: str) -> None:
        self.reusable = False
        self._waiting = self._complete = False
        error = UpstreamError(message)
        waiter, self.head_waiter = self.head_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        answer, self.answer = self.answer, None
        if answer is not None:
            answer._end(error)
        self.abort()

    # ---- used by the pool ------------------------------------------------------------

    def start(self, head: bytes, no_body: bool) -> asyncio.Future[Answer]:
        """Send a request head (with its body when known); the future gets the answer."""
        assert self.transport is not None
        self.got_bytes = False
        self.no_body = no_body
        self._waiting = True
        self._head_bytes = 0
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
        one keeps the client's, else goes chunked). Raises ``InvalidRequest``
        (nothing sent) for a header that HTTP/1.1 cannot carry, ``UpstreamError``
        (or another ``OSError``) when no answer head arrives.
        """
        if self.invalid:
            raise UpstreamError(self.invalid)
        streamed = body is not None and not isinstance(body, bytes)
        head = self._request_head(method, target, headers, body, streamed)
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

    def _request_head(self, method: str, target: str, headers: list[tuple[str, str]],
                      body: Body, streamed: bool) -> bytes:
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
        text = "".join(parts)
        try:
            return text.encode("latin-1")
        except UnicodeEncodeError:
            raise InvalidRequest(_not_latin1(method, target, headers)) from None

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


def _not_latin1(method: str, target: str, headers: list[tuple[str, str]]) -> str:
    """What cannot be written: HTTP/1.1 carries header bytes, read here as Latin-1."""
    for name, value in headers:
        try:
            name.encode("latin-1")
            value.encode("latin-1")
        except UnicodeEncodeError:
            return (f"header {name!r} has a character outside Latin-1 (ISO-8859-1); "
                    "send non-ASCII header values percent- or base64-encoded")
    return f"the request line {method} {target[:80]!r} has a character outside Latin-1"


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
