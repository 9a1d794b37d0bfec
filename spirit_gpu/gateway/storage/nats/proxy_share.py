"""The proxy route across replicas on NATS: a shared registry, relayed queued answers.

Each replica keeps its own ``ProxyRegistry``; every register beat and
deregistration a replica receives is published on ``spirit.proxy.reg`` and
applied by the others. So any replica knows every proxy worker of a serverless
id and routes to it over HTTP at the URL the worker registered; a worker's
proxy link, when it dialled one, is used only by the replica it is linked to
(the others reach the same worker at its URL). A replica that starts learns a
worker at its next beat (every few seconds).

A queued proxy job (gateway/proxy/queued.py) is answered by a worker's
``request-proxy`` POST, which a load balancer may send to any replica. The
replica that takes it and does not hold the client relays it to the one that
does (the record's ``waiter``) on ``spirit.proxy.answer.<replica>``: a head,
the body in pieces below the message limit, an end. Each piece is a request,
answered once the client handler asks for the next one, so the worker's upload
runs at the client's pace; the end is answered with how the copy ended, and
only then is the worker's POST answered (as on one replica). A piece answered
"no" (the client is gone) stops the relay; a worker answer that breaks off is
passed on as a cut, so the client sees an incomplete response, not a wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import aiohttp
import msgspec
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from spirit_gpu.gateway.proxy.queued import ProxyAnswer
from spirit_gpu.gateway.proxy.registry import ProxyRegistry
from spirit_gpu.gateway.storage.base import RequestRecord
from spirit_gpu.gateway.storage.nats import names
from spirit_gpu.gateway.storage.nats.store import NatsStorage
from spirit_gpu.log import logger
from spirit_gpu.protocol.proxy import ProxyRegistration

ANSWER_SUBJECT = "spirit.proxy.answer"  # .<replica>: answers relayed to the client's replica
_HEAD_WAIT = 5.0  # the replica holding the client answers a head at once
_ROOM = 4096  # below the message limit: the piece's envelope
_SENDER = "Spirit-Replica"  # header: the replica relaying an answer


class _Note(msgspec.Struct):
    origin: str
    sid: str
    worker_id: str
    reg: ProxyRegistration | None = None  # None: deregistered


class _Part(msgspec.Struct, omit_defaults=True):
    """One message of a relayed answer."""

    rid: str
    kind: str  # head | data | end | cut
    status: int = 0
    headers: list[tuple[str, str]] = []
    length: int | None = None
    data: bytes = b""
    why: str = ""  # cut: what broke


class _Reply(msgspec.Struct):
    ok: bool  # False: no client takes it (any more)
    outcome: str = ""  # how the copy to the client ended ("" when whole)


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(_Note).decode
_decode_part = msgspec.msgpack.Decoder(_Part).decode
_decode_reply = msgspec.msgpack.Decoder(_Reply).decode


class ProxyShare:
    def __init__(self, storage: NatsStorage, registry: ProxyRegistry) -> None:
        self.storage = storage
        self.registry = registry
        self._applying = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.answers = AnswerRelay(storage)
        registry.on_register = self._registered
        registry.on_deregister = self._deregistered
        registry.answer_relay = self.answers

    async def start(self) -> None:
        await self.storage.nc.subscribe(names.PROXY_SUBJECT, cb=self._on_note)
        await self.answers.start()

    def _registered(self, sid: str, reg: ProxyRegistration) -> None:
        self._publish(_Note(self.storage.replica, sid, reg.workerID, reg))

    def _deregistered(self, sid: str, worker_id: str) -> None:
        self._publish(_Note(self.storage.replica, sid, worker_id))

    def _publish(self, note: _Note) -> None:
        if self._applying:  # a note from another replica being applied: not ours to tell
            return
        task = asyncio.create_task(self._send(note))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, note: _Note) -> None:
        try:
            await self.storage.nc.publish(names.PROXY_SUBJECT, _encode(note))
        except Exception as exc:  # noqa: BLE001 - the next beat tells them again
            logger.warn(f"proxy registry: sharing {note.worker_id} failed: {exc!r}")

    async def _on_note(self, msg: Msg) -> None:
        try:
            note = _decode(msg.data)
        except msgspec.DecodeError:
            return
        if note.origin == self.storage.replica:
            return
        self._applying = True
        try:
            if note.reg is None:
                self.registry.deregister(note.sid, note.worker_id)
            else:
                self.registry.register(note.sid, note.reg)
        finally:
            self._applying = False


class _Incoming:
    """A relayed answer's body as the client handler reads it. A piece's request is
    answered when the handler asks for the next piece (the previous one is written)."""

    def __init__(self, sender: str) -> None:
        self.sender = sender
        self.copied: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.queue: asyncio.Queue[tuple[bytes, Msg] | _Part] = asyncio.Queue()
        self.unanswered: Msg | None = None

    def __aiter__(self) -> _Incoming:
        return self

    async def __anext__(self) -> bytes:
        if self.unanswered is not None:
            msg, self.unanswered = self.unanswered, None
            await _respond(msg, _Reply(ok=True))
        item = await self.queue.get()
        if isinstance(item, _Part):  # end or cut
            if item.kind == "cut":
                raise ConnectionError(f"the worker's answer broke off at replica "
                                      f"{self.sender}: {item.why}")
            raise StopAsyncIteration
        data, self.unanswered = item
        return data

    def stop(self, outcome: str) -> list[Msg]:
        """The copy ended: the requests still waiting for an answer."""
        waiting = [self.unanswered] if self.unanswered is not None else []
        self.unanswered = None
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if not isinstance(item, _Part):
                waiting.append(item[1])
        return waiting


class AnswerRelay:
    """``queued.AnswerRelay`` over NATS core request/reply."""

    def __init__(self, storage: NatsStorage) -> None:
        self.storage = storage
        self._held: dict[str, asyncio.Future[ProxyAnswer]] = {}
        self._incoming: dict[str, _Incoming] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.storage.nc.subscribe(f"{ANSWER_SUBJECT}.{self.storage.replica}",
                                        cb=self._on_part)

    # --- the replica holding the client ------------------------------------------------
    def hold(self, request_id: str, waiter: asyncio.Future[ProxyAnswer]) -> None:
        self._held[request_id] = waiter

    def release(self, request_id: str) -> None:
        self._held.pop(request_id, None)

    async def _on_part(self, msg: Msg) -> None:
        try:
            part = _decode_part(msg.data)
        except msgspec.DecodeError:
            return
        if part.kind == "head":
            await self._head(part, msg)
            return
        incoming = self._incoming.get(part.rid)
        if incoming is None:  # its copy ended
            await _respond(msg, _Reply(ok=False, outcome="the client handler ended"))
        elif part.kind == "data":
            incoming.queue.put_nowait((part.data, msg))
        elif part.kind == "end":
            incoming.queue.put_nowait(part)
            self._spawn(self._answer_end(incoming, msg))
        else:  # cut
            incoming.queue.put_nowait(part)
            await _respond(msg, _Reply(ok=True))

    async def _head(self, part: _Part, msg: Msg) -> None:
        waiter = self._held.get(part.rid)
        if waiter is None or waiter.done():
            await _respond(msg, _Reply(ok=False))
            return
        sender = (msg.headers or {}).get(_SENDER, "?")
        incoming = _Incoming(sender)
        self._incoming[part.rid] = incoming
        incoming.copied.add_done_callback(lambda done: self._copied(part.rid, done))
        waiter.set_result(ProxyAnswer(status=part.status, headers=part.headers,
                                      length=part.length, body=incoming,
                                      copied=incoming.copied))
        await _respond(msg, _Reply(ok=True))

    def _copied(self, request_id: str, done: asyncio.Future[str]) -> None:
        incoming = self._incoming.pop(request_id, None)
        if incoming is None:
            return
        outcome = done.result() if not done.cancelled() else "the client handler ended"
        for msg in incoming.stop(outcome):
            self._spawn(_respond(msg, _Reply(ok=False, outcome=outcome)))

    async def _answer_end(self, incoming: _Incoming, msg: Msg) -> None:
        await _respond(msg, _Reply(ok=True, outcome=await incoming.copied))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- the replica the worker posted the answer to -----------------------------------
    async def send(self, rec: RequestRecord, answer: ProxyAnswer,
                   timeout: float) -> str | None:
        holder = rec.waiter if isinstance(rec, names.Doc) else ""
        if not holder or holder == self.storage.replica:
            return None
        subject = f"{ANSWER_SUBJECT}.{holder}"
        rid = rec.request_id
        try:
            head = await self._request(subject, _Part(rid, "head", answer.status,
                                                      answer.headers, answer.length),
                                       _HEAD_WAIT)
        except (NatsError, TimeoutError) as exc:
            logger.warn(f"queued proxy answer: replica {holder} holding its client did "
                        f"not take it: {exc!r}", request_id=rid)
            return None
        if not head.ok:
            return None
        piece = max(1024, self.storage.nc.max_payload - _ROOM)
        try:
            while True:
                try:
                    chunk = await anext(answer.body)
                except StopAsyncIteration:
                    break
                except (aiohttp.ClientError, OSError) as exc:  # the worker's upload broke
                    await self._request(subject, _Part(rid, "cut", why=repr(exc)), _HEAD_WAIT)
                    return f"transfer broke: {exc!r}"
                for at in range(0, len(chunk), piece):
                    reply = await self._request(
                        subject, _Part(rid, "data", data=chunk[at:at + piece]), timeout)
                    if not reply.ok:
                        return reply.outcome or "the client handler ended"
            return (await self._request(subject, _Part(rid, "end"), timeout)).outcome
        except (NatsError, TimeoutError) as exc:
            return f"transfer broke: relaying to replica {holder}: {exc!r}"

    async def _request(self, subject: str, part: _Part, timeout: float) -> _Reply:
        msg = await self.storage.nc.request(subject, _encode(part), timeout=timeout,
                                            headers={_SENDER: self.storage.replica})
        return _decode_reply(msg.data)


async def _respond(msg: Msg, reply: _Reply) -> None:
    try:
        await msg.respond(_encode(reply))
    except (NatsError, OSError) as exc:  # the asker times out and says so
        logger.warn(f"queued proxy answer: a relay reply was lost: {exc!r}")
