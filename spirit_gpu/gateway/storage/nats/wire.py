"""Wire: a second, lean connection to NATS for the store's per-request traffic.

nats-py takes every publish through a flusher task and a socket write of its
own, and every message through its read loop, a ``Msg``, the subscription's
queue and that subscription's task: about 100 us of gateway CPU for one
JetStream publish and its acknowledgement, as much as the rest of an accepted
request. Here publishes made in one event-loop turn leave in one write, and
messages are parsed in ``data_received`` and handed to their subscription's
callback there. It speaks only what request/reply needs (PUB, HPUB, SUB, MSG,
HMSG, PING, PONG, INFO, -ERR); nats-py keeps the rest (stream and consumer
management, the object store, watchers, broadcasts).

Messages on the two connections are not ordered with each other; what goes
over the wire is either a call answered before anything depends on it or an
ack subject, which works from any connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import ssl
from collections.abc import Callable, Coroutine
from typing import Any, cast
from urllib.parse import urlsplit

import msgspec
import nats.errors

from spirit_gpu.gateway.storage.nats.server import credentials
from spirit_gpu.log import logger

# subject, reply, header block (b"" when none: ``parse_headers`` reads one), data
Handler = Callable[[str, str, bytes, bytes], None]

_CRLF = b"\r\n"
_HDR_LINE = b"NATS/1.0"
_RECONNECT_WAIT = (0.1, 2.0)  # seconds: first pause, longest pause
_CONNECT_TIMEOUT = 3.0
_PINGS_OUTSTANDING = 3


class _Info(msgspec.Struct):
    max_payload: int = 1024 * 1024
    tls_required: bool = False
    auth_required: bool = False


def new_inbox() -> str:
    return f"_INBOX.{secrets.token_hex(11)}"


def status_of(block: bytes) -> str:
    """The inline status of a header block (``NATS/1.0 404 ...``), or ""."""
    if not block.startswith(b"NATS/1.0 "):
        return ""
    return block[9:block.find(b"\r\n")].split(b" ", 1)[0].decode()


def parse_headers(block: bytes) -> dict[str, str]:
    """``NATS/1.0 404 No Messages\\r\\nKey: Value\\r\\n\\r\\n`` -> a dict; an inline
    status goes under ``Status`` and ``Description`` (as nats-py's do)."""
    lines = block.decode("utf-8", "replace").split("\r\n")
    out: dict[str, str] = {}
    status = lines[0][len("NATS/1.0"):].strip()
    if status:
        code, _, desc = status.partition(" ")
        out["Status"] = code
        if desc:
            out["Description"] = desc
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


def _header_block(headers: dict[str, str]) -> bytes:
    parts = [_HDR_LINE, _CRLF]
    for k, v in headers.items():
        parts += [k.encode(), b": ", v.encode(), _CRLF]
    parts.append(_CRLF)
    return b"".join(parts)


class _Protocol(asyncio.Protocol):
    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.info: asyncio.Future[_Info] = asyncio.get_running_loop().create_future()
        self.pong: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is not a subclass)

    def connection_lost(self, exc: Exception | None) -> None:
        for fut in (self.info, self.pong):
            if fut is not None and not fut.done():
                fut.set_exception(nats.errors.ConnectionClosedError())
        self.wire._lost(self)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        end = len(buf)
        try:
            while pos < end:
                eol = buf.find(_CRLF, pos)
                if eol < 0:
                    break
                op = bytes(buf[pos:eol])
                if op.startswith((b"MSG ", b"HMSG ")):
                    args = op.split(b" ")
                    hmsg = args[0] == b"HMSG"
                    total = int(args[-1])
                    start = eol + 2
                    if start + total + 2 > end:
                        break  # the rest of this message is still on its way
                    hdr_len = int(args[-2]) if hmsg else 0
                    reply = args[3].decode() if len(args) == (6 if hmsg else 5) else ""
                    headers = bytes(buf[start:start + hdr_len]) if hmsg else b""
                    data_ = bytes(buf[start + hdr_len:start + total])
                    pos = start + total + 2
                    self.wire._deliver(int(args[2]), args[1].decode(), reply, headers, data_)
                    continue
                pos = eol + 2
                self._control(op)
        finally:
            del buf[:pos]

    def _control(self, op: bytes) -> None:
        if op == b"PING":
            self.write(b"PONG\r\n")
        elif op == b"PONG":
            self.wire._ponged(self)
        elif op.startswith(b"INFO "):
            info = msgspec.json.decode(op[5:], type=_Info)
            if not self.info.done():
                self.info.set_result(info)
            else:
                self.wire.max_payload = info.max_payload
        elif op.startswith(b"-ERR"):
            logger.warn(f"NATS (store wire): {op[5:].decode(errors='replace')}")

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


def _sub_line(sid: int, subject: str) -> bytes:
    return f"SUB {subject} {sid}\r\n".encode()


class Wire:
    def __init__(self, urls: list[str], name: str, ping_every: float = 5.0,
                 known: Callable[[], list[str]] | None = None) -> None:
        self.urls = urls
        # where to reconnect, best first (the store's: the servers its main connection
        # knows, the cluster's discovered ones included); else ``urls`` in turn
        self.known = known
        self.name = name
        # (as the main connection's: a peer gone silent is noticed in about 20 s)
        self.ping_every = ping_every
        self.max_payload = 1024 * 1024
        self._proto: _Protocol | None = None  # set while connected
        self._out: list[bytes] = []
        self._flush_soon = False
        self._subs: dict[int, tuple[str, Handler]] = {}
        self._next_sid = 1
        self._closed = False
        self._pings = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.on_lost: list[Callable[[], None]] = []  # called when the connection drops

    @property
    def connected(self) -> bool:
        return self._proto is not None

    # --- connecting -------------------------------------------------------------
    async def connect(self) -> None:
        """The first connection: any URL of the list; raises when none answers."""
        error: BaseException | None = None
        for url in self.urls:
            try:
                await self._open(url)
                self._spawn(self._pinger())
                return
            except (OSError, TimeoutError, nats.errors.Error, ssl.SSLError) as exc:
                error = exc
        raise nats.errors.NoServersError() from error

    async def _open(self, url: str) -> None:
        loop = asyncio.get_running_loop()
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 4222
        transport, proto = await asyncio.wait_for(
            loop.create_connection(lambda: _Protocol(self), host, port), _CONNECT_TIMEOUT)
        try:
            info = await asyncio.wait_for(asyncio.shield(proto.info), _CONNECT_TIMEOUT)
            if parts.scheme == "tls" or info.tls_required:
                tls = await loop.start_tls(transport, proto, ssl.create_default_context(),
                                           server_hostname=host)
                proto.transport = cast(asyncio.Transport, tls)
            self.max_payload = info.max_payload
            connect: dict[str, object] = {
                "verbose": False, "pedantic": False, "headers": True, "no_responders": True,
                "lang": "python3", "version": "spirit-wire", "protocol": 1,
                "name": self.name}
            auth = credentials([url])  # (decoded as the main connection's are)
            if "token" in auth:
                connect["auth_token"] = auth["token"]
            elif auth:
                connect["user"], connect["pass"] = auth["user"], auth["password"]
            proto.pong = loop.create_future()
            lines = [b"CONNECT " + msgspec.json.encode(connect) + _CRLF]
            sent = dict(self._subs)
            lines += [_sub_line(sid, subject)
                      for sid, (subject, _) in sent.items()]
            lines.append(b"PING\r\n")
            proto.write(b"".join(lines))
            # an -ERR (bad credentials) is followed by the server closing: the PONG
            # never comes and this raises
            await asyncio.wait_for(asyncio.shield(proto.pong), _CONNECT_TIMEOUT)
        except BaseException:
            (proto.transport or transport).close()
            raise
        self._proto = proto
        self._pings = 0
        # subscriptions made or dropped while connecting (not yet written)
        changed = [_sub_line(sid, subject)
                   for sid, (subject, _) in self._subs.items() if sid not in sent]
        changed += [f"UNSUB {sid}\r\n".encode() for sid in sent if sid not in self._subs]
        if changed:
            proto.write(b"".join(changed))
        if self._out:
            self._flush()

    def _lost(self, proto: _Protocol) -> None:
        if self._proto is not proto:
            return  # a connection that never finished connecting
        self._proto = None
        self._out.clear()  # (calls waiting on what was in it fail below)
        for cb in self.on_lost:
            cb()
        if not self._closed:
            logger.warn("NATS (store wire): disconnected; reconnecting")
            self._spawn(self._reconnect())

    async def _reconnect(self) -> None:
        pause = _RECONNECT_WAIT[0]
        tries = 0
        while not self._closed and self._proto is None:
            urls = (self.known() if self.known is not None else []) or self.urls
            url = urls[tries % len(urls)]
            tries += 1
            try:
                await self._open(url)
                logger.info("NATS (store wire): reconnected")
                return
            except (OSError, TimeoutError, nats.errors.Error, ssl.SSLError):
                await asyncio.sleep(pause)
                pause = min(pause * 2, _RECONNECT_WAIT[1])

    async def _pinger(self) -> None:
        """Notice a peer that went away without closing (the main connection does the
        same): three unanswered pings drop the connection, which reconnects."""
        while not self._closed:
            await asyncio.sleep(self.ping_every)
            proto = self._proto
            if proto is None:
                continue
            self._pings += 1
            if self._pings > _PINGS_OUTSTANDING:
                logger.warn("NATS (store wire): the server stopped answering pings")
                if proto.transport is not None:
                    proto.transport.abort()
                continue
            proto.write(b"PING\r\n")

    def _ponged(self, proto: _Protocol) -> None:
        if proto.pong is not None and not proto.pong.done():
            proto.pong.set_result(None)
        self._pings = 0

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None:
            proto.transport.close()

    # --- messages ---------------------------------------------------------------
    def subscribe(self, subject: str, handler: Handler) -> int:
        sid = self._next_sid
        self._next_sid += 1
        self._subs[sid] = (subject, handler)
        if self._proto is not None:
            self._proto.write(_sub_line(sid, subject))
        return sid

    def unsubscribe(self, sid: int) -> None:
        if self._subs.pop(sid, None) is not None and self._proto is not None:
            self._proto.write(f"UNSUB {sid}\r\n".encode())

    def publish(self, subject: str, payload: bytes, reply: str = "",
                headers: dict[str, str] | None = None) -> None:
        """Queue a message; it leaves at the end of this event-loop turn. Raises
        nats-py's errors: ConnectionClosedError while disconnected (nothing is
        buffered across a reconnect: a caller retries), MaxPayloadError."""
        if self._proto is None:
            raise nats.errors.ConnectionClosedError
        if len(payload) > self.max_payload:
            raise nats.errors.MaxPayloadError
        to = f"{subject} {reply}" if reply else subject
        if headers:
            hdr = _header_block(headers)
            self._out.append(f"HPUB {to} {len(hdr)} {len(hdr) + len(payload)}\r\n".encode())
            self._out.append(hdr)
        else:
            self._out.append(f"PUB {to} {len(payload)}\r\n".encode())
        self._out.append(payload)
        self._out.append(_CRLF)
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        if self._out and self._proto is not None:
            self._proto.write(b"".join(self._out))
            self._out.clear()

    def _deliver(self, sid: int, subject: str, reply: str, headers: bytes,
                 data: bytes) -> None:
        sub = self._subs.get(sid)
        if sub is None:
            return
        try:
            sub[1](subject, reply, headers, data)
        except Exception as exc:  # noqa: BLE001 - one bad message must not stop the rest
            logger.error(f"NATS (store wire): a message on {subject} failed: {exc!r}")
