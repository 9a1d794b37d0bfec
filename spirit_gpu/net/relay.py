"""One HTTP hop of the proxy path: header filtering and streaming a response through.

Every hop uses the one ``relay``: gateway -> worker over HTTP (aiohttp's
client, wrapped in ``ClientAnswer``), gateway <- worker over the proxy link
(``gateway.proxy.link.LinkAnswer``) and worker listener -> LLM server
(``supervisor.proxy.upstream``).
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
import msgspec
from aiohttp import web
from multidict import CIMultiDict

from spirit_gpu.net.aiohttp_internals import LazyHeadResponse, cut_connection, send_continue

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
_encode = msgspec.json.encode


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
        await send_continue(request)
    length = request.content_length
    if length is not None and length <= SMALL_BODY:
        content = request.content
        if content.is_eof():  # all here already (a small body usually is): no read loop
            return content.read_nowait()
        return await request.read()
    return request.content


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


# On /v1/* (OpenAI's API) an error is OpenAI's shape, which its SDKs show: "type", "code".
_OPENAI_ERRORS = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    408: ("timeout", "request_timeout"),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "service_unavailable"),
}


def error_body(path: str, status: int, message: str) -> bytes:
    """A proxy-route error as its client reads it.

    ``/v1/*``: ``{"error": {"message", "type", "code", "param"}}`` (OpenAI's
    shape); elsewhere (``/api/*``, ollama's API): ``{"error": "message"}``.
    """
    if path.startswith("/v1/"):
        kind, code = _OPENAI_ERRORS.get(status, ("server_error", "internal_error"))
        return _encode({"error": {"message": message, "type": kind, "code": code,
                                  "param": None}})
    return _encode({"error": message})


def proxy_error(path: str, status: int, message: str,
                headers: dict[str, str] | None = None) -> web.Response:
    """``error_body`` as a response."""
    return web.Response(body=error_body(path, status, message), status=status,
                        content_type="application/json", headers=headers)


class UpstreamAnswer(Protocol):
    """What ``relay`` needs of an upstream's answer, whichever hop it came over.

    ``upstream.Answer`` (worker -> LLM server), ``ClientAnswer`` (gateway ->
    worker listener over HTTP) and ``gateway.proxy.link.LinkAnswer`` (gateway
    <- worker over the proxy link) have it.
    """

    status: int
    reason: str
    headers: list[tuple[str, str]]
    content_length: int | None  # of the body, when framed by Content-Length

    @property
    def complete(self) -> bool:
        """The whole body has arrived (it may still wait to be read)."""

    @property
    def pending(self) -> bool:
        """Body bytes are here: the next ``read`` returns without waiting."""

    async def read(self) -> bytes:
        """The next piece of the body; b"" at its end. Raises ``OSError`` (or
        ``aiohttp.ClientError``) when the upstream broke it."""

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

    @property
    def complete(self) -> bool:
        return self.response.content.is_eof()

    @property
    def pending(self) -> bool:
        return False  # not knowable without aiohttp's internals: the head goes out at once

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


async def relay(request: web.BaseRequest, upstream: UpstreamAnswer,
                extra_headers: dict[str, str] | None = None,
                deadline: float | None = None) -> Relayed:
    """Stream ``upstream``'s response to ``request``'s client, chunk by chunk.

    A body that is small with a known length, or already all here, goes out
    in one write with its length. Otherwise the head waits for the first body
    bytes when they are already here (one write), else goes out at once; the
    last piece travels with the terminator. ``deadline`` (loop time) cuts a
    transfer still running then. A broken upstream or a passed deadline cut
    the client connection (the client sees an incomplete response, never a
    truncated body that looks whole).
    """
    headers = CIMultiDict(filter_pairs(upstream.headers, HOP_BY_HOP))
    if extra_headers:
        headers.update(extra_headers)
    length = upstream.content_length
    if request.method != "HEAD" and (upstream.complete or (length is not None
                                                            and length <= SMALL_RESPONSE)):
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
            return Relayed(json_error(502, f"upstream failed mid-response: {exc}"),
                           cut="upstream", detail=str(exc) or repr(exc))
        headers.popall("Content-Length", None)
        return Relayed(web.Response(status=upstream.status, reason=upstream.reason or None,
                                    body=body, headers=headers), len(body))

    resp = LazyHeadResponse(status=upstream.status, reason=upstream.reason or None,
                            headers=headers)
    result = Relayed(resp)
    try:
        await resp.prepare(request)
        if not upstream.pending:  # no body bytes yet: the head goes out alone, now
            await resp.send_head()
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
            result.cut, result.detail = "upstream", str(exc) or repr(exc)
            return
        if not chunk:
            return
        try:
            if upstream.complete and not upstream.pending:  # the last piece: with the end
                await resp.write_eof(chunk)
            else:
                await resp.write(chunk)
        except ConnectionError as exc:  # the client went away
            result.cut, result.detail = "client", repr(exc)
            return
        result.nbytes += len(chunk)
