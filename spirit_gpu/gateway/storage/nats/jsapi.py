"""The two JetStream calls the store makes for every request: publish (with its
acknowledgement) and direct get by subject.

nats-py's ``JetStreamContext.publish`` and ``get_msg`` cost about 50 us of CPU each
(a JSON decode into dataclasses, ``asyncio.wait_for``, timestamp parsing); a
request makes several. These speak the same protocol (a core publish whose reply
comes to an inbox of ours) over the store's lean connection (``wire``), with one
wildcard subscription, one future and one timer per call. Errors are nats-py's
own, so callers handle them as they would its calls'.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import msgspec
import nats.errors
from nats.js.errors import APIError, ServiceUnavailableError

from spirit_gpu.gateway.storage.nats.wire import Wire, new_inbox, parse_headers, status_of

_STATUS = "Status"


class _Error(msgspec.Struct):
    code: int = 0
    err_code: int | None = None
    description: str = ""


class _PubAck(msgspec.Struct):
    seq: int = 0
    duplicate: bool = False
    error: _Error | None = None


_decode_ack = msgspec.json.Decoder(_PubAck).decode


class Stored(msgspec.Struct):
    """A message read back: its data, stream sequence and headers."""

    data: bytes
    seq: int
    headers: dict[str, str]


class _Reply(msgspec.Struct):
    headers: bytes  # the raw block (``parse_headers``)
    data: bytes


class JetStreamCalls:
    def __init__(self, wire: Wire, prefix: str = "$JS.API", timeout: float = 5.0) -> None:
        self.wire = wire
        self.prefix = prefix
        self.timeout = timeout
        self._inbox = new_inbox()
        self._ids = itertools.count(1)
        self._waiting: dict[str, asyncio.Future[_Reply]] = {}
        self._sid = 0

    async def start(self) -> None:
        self._sid = self.wire.subscribe(f"{self._inbox}.*", self._on_reply)
        self.wire.on_lost.append(self._lost)

    def _on_reply(self, subject: str, _reply: str, headers: bytes, data: bytes) -> None:
        fut = self._waiting.pop(subject, None)
        if fut is not None and not fut.done():
            fut.set_result(_Reply(headers, data))

    def _lost(self) -> None:
        """The connection dropped: no answer to a call in flight will come."""
        waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(nats.errors.ConnectionClosedError())

    async def _call(self, subject: str, payload: bytes,
                    headers: dict[str, str] | None = None) -> _Reply:
        reply = f"{self._inbox}.{next(self._ids)}"
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[_Reply] = loop.create_future()
        self.wire.publish(subject, payload, reply=reply, headers=headers)
        self._waiting[reply] = fut
        timer = loop.call_later(self.timeout, _time_out, fut)
        try:
            msg = await fut
        finally:
            timer.cancel()
            self._waiting.pop(reply, None)
        if not msg.data and status_of(msg.headers) == "503":
            raise nats.errors.NoRespondersError
        return msg

    async def publish(self, subject: str, payload: bytes,
                      headers: dict[str, str] | None = None) -> tuple[int, bool]:
        """Store a message; its stream sequence and whether it was a duplicate.
        Raises APIError (``err_code`` set) when JetStream refuses it."""
        msg = await self._call(subject, payload, headers)
        ack = _decode_ack(msg.data)
        if ack.error is not None:
            e = ack.error
            if e.code == 503:
                raise ServiceUnavailableError(code=e.code, err_code=e.err_code,
                                              description=e.description)
            raise APIError(code=e.code, err_code=e.err_code, description=e.description)
        return ack.seq, ack.duplicate

    async def last(self, stream: str, subject: str) -> Stored | None:
        """The last message on ``subject`` (the stream allows direct get); None when
        there is none."""
        msg = await self._call(f"{self.prefix}.DIRECT.GET.{stream}.{subject}", b"")
        hdrs = parse_headers(msg.headers) if msg.headers else {}
        if not msg.data:
            status = hdrs.get(_STATUS)
            if status == "404":
                return None
            if status:
                raise APIError(code=int(status), description=hdrs.get("Description", ""))
        return Stored(data=msg.data, seq=int(hdrs.get("Nats-Sequence", "0")), headers=hdrs)

    async def close(self) -> None:
        for fut in self._waiting.values():
            fut.cancel()
        self._waiting.clear()
        if self._sid:
            self.wire.unsubscribe(self._sid)
        with contextlib.suppress(ValueError):
            self.wire.on_lost.remove(self._lost)


def _time_out(fut: asyncio.Future[_Reply]) -> None:
    if not fut.done():
        fut.set_exception(nats.errors.TimeoutError())

