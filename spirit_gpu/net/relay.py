"""One HTTP hop of the proxy path: header filtering and streaming a response through.

Both hops use it: gateway -> worker listener (aiohttp's client, wrapped in
``ClientAnswer``) and worker listener -> LLM server (``supervisor.proxy.upstream``).
Bodies are never buffered whole: a request body is passed on as a stream (a
small body with a known length is read first, it is already in memory), and a
response is written to the client chunk by chunk as the upstream produces it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

# RFC 9110 7.6.1 connection-specific headers, plus Host (the client sets its own)
# and Expect (each hop answers ``100-continue`` to its own client; passed on, the
# next hop's client would wait for a 100 that a low-level server never sends).
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade", "host", "expect",
})
# A request body with a known length up to this size is read before forwarding
# (aiohttp has it in memory already); larger or chunked bodies are streamed.
SMALL_BODY = 256 * 1024
# A response with a known length up to this size goes out in one write.
SMALL_RESPONSE = 64 * 1024

# aiohttp's client would otherwise add its own User-Agent, Accept, Accept-Encoding
# and Content-Type: the upstream must see the client's headers, no more.
SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def filter_pairs(items: Iterable[tuple[str, str]], drop: frozenset[str]) -> list[tuple[str, str]]:
    """``items`` without hop-by-hop headers, the ones named in ``Connection``, and ``drop``.

    One pass over plain ``(str, str)`` pairs (what the proxy link carries).
    """
    out: list[tuple[str, str]] = []
    named = ""
    for key, value in items:
        low = key.lower()
        if low in drop:
            if low == "connection":
                named = f"{named},{value}"
            continue
        out.append((str(key), value))
    if named:
        gone = {t.strip().lower() for t in named.split(",")}
        out = [(k, v) for k, v in out if k.lower() not in gone]
    return out


def new_session(limit: int = 0) -> aiohttp.ClientSession:
    """A keep-alive pool that passes bytes through untouched.

    No decompression (``Content-Encoding`` stays true), and no cookie jar: the
    pool is shared by every client, so a ``Set-Cookie`` from upstream must
    reach its own client only, never ride along on someone else's request.
    """
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, keepalive_timeout=30.0)
    return aiohttp.ClientSession(
        connector=connector, auto_decompress=False, skip_auto_headers=SKIP_AUTO_HEADERS,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10.0),
    )


async def request_body(request: web.BaseRequest) -> Any:
    """What to send upstream: the bytes when small and known, else the stream."""
    if not request.body_exists:
        return None
    if request.headers.get("Expect", "").lower() == "100-continue" and not request.content.is_eof():
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # go on, send it
    length = request.content_length
    if length is not None and length <= SMALL_BODY:
        content = request.content
        if content.is_eof():  # all here already (a small body usually is): no read loop
            return content.read_nowait()
        return await request.read()
    return request.content


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


class UpstreamAnswer(Protocol):
    """What ``relay`` needs of an upstream's answer (``upstream.Answer`` has it)."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    content_length: int | None  # of the body, when framed by Content-Length

    async def read(self) -> bytes:
        """The next piece of the body; b"" at its end."""

    async def read_all(self) -> bytes: ...


class ClientAnswer:
    """aiohttp's ``ClientResponse`` as an ``UpstreamAnswer`` (the gateway's HTTP path)."""

    __slots__ = ("response", "status", "reason", "headers", "content_length")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.status = response.status
        self.reason = response.reason or ""
        self.headers = list(response.headers.items())
        self.content_length = response.content_length

    async def read(self) -> bytes:
        return await self.response.content.readany()

    async def read_all(self) -> bytes:
        return await self.response.read()


@dataclass
class Relayed:
    """How a relay ended. ``cut``: "" (complete), "client", "upstream" or "deadline"."""

    response: web.StreamResponse
    nbytes: int = 0
    cut: str = ""
    detail: str = ""


class LazyHeadResponse(web.StreamResponse):
    """A streamed response whose head waits for the first body bytes: one write, not two.

    aiohttp's own ``Response`` works this way; a ``StreamResponse`` sends its head
    at ``prepare``. ``write(b"")`` sends a head that should not wait.
    """

    _send_headers_immediately = False


def cut_connection(request: web.BaseRequest) -> None:
    """End a started response without its terminator: the client sees an error.

    Chunks already written are flushed first; aiohttp's own ``write_eof`` then
    fails quietly on the closed transport.
    """
    transport = request.transport
    if transport is not None and not transport.is_closing():
        transport.close()


async def relay(request: web.BaseRequest, upstream: UpstreamAnswer,
                extra_headers: dict[str, str] | None = None,
                deadline: float | None = None) -> Relayed:
    """Stream ``upstream``'s response to ``request``'s client, chunk by chunk.

    ``deadline`` (loop time) cuts a transfer still running then. A broken
    upstream or a passed deadline cut the client connection (the client sees
    an incomplete response, never a truncated body that looks whole).
    """
    headers = CIMultiDict(filter_pairs(upstream.headers, HOP_BY_HOP))
    if extra_headers:
        headers.update(extra_headers)
    length = upstream.content_length
    if length is not None and length <= SMALL_RESPONSE and request.method != "HEAD":
        try:
            if deadline is None:
                body = await upstream.read_all()
            else:
                async with asyncio.timeout_at(deadline):
                    body = await upstream.read_all()
        except TimeoutError:
            return Relayed(json_error(408, "request timeout: transfer limit reached"),
                           cut="deadline", detail="transfer limit reached")
        except (aiohttp.ClientError, OSError) as exc:
            return Relayed(json_error(502, f"upstream failed mid-response: {exc!r}"),
                           cut="upstream", detail=repr(exc))
        headers.popall("Content-Length", None)
        return Relayed(web.Response(status=upstream.status, reason=upstream.reason or None,
                                    body=body, headers=headers), len(body))

    resp = web.StreamResponse(status=upstream.status, reason=upstream.reason or None,
                              headers=headers)
    result = Relayed(resp)
    try:
        await resp.prepare(request)
    except ConnectionError as exc:
        result.cut, result.detail = "client", repr(exc)
        return result
    try:
        if deadline is None:
            await _pump(upstream, resp, result)
        else:
            async with asyncio.timeout_at(deadline):
                await _pump(upstream, resp, result)
    except TimeoutError:
        result.cut, result.detail = "deadline", "transfer limit reached"
    if result.cut in ("upstream", "deadline"):
        cut_connection(request)
    return result


async def _pump(upstream: UpstreamAnswer, resp: web.StreamResponse, result: Relayed) -> None:
    while True:
        try:
            chunk = await upstream.read()
        except (aiohttp.ClientError, OSError) as exc:
            result.cut, result.detail = "upstream", repr(exc)
            return
        if not chunk:
            return
        try:
            await resp.write(chunk)
        except ConnectionError as exc:  # the client went away
            result.cut, result.detail = "client", repr(exc)
            return
        result.nbytes += len(chunk)
