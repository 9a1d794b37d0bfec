"""NatsStorage: the Storage interface on NATS JetStream, shared by every replica.

Nothing a request needs lives only in one replica's memory: its queue message,
its record (status, result), its chunks and its lease are in JetStream, and
any replica can act on them (the ack subject of a delivery works from any
connection). What is per replica is only who waits: a sync request's client
is woken through ``spirit.done.<replica>`` (with a periodic re-read as the
fallback), an SSE stream reads the chunk subject, and a cancel of a running
request is broadcast so the replica holding the worker's link can tell it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo, DeliverPolicy, Header
from nats.js.errors import APIError, NotFoundError
from nats.js.object_store import ObjectStore

from spirit_gpu.gateway.storage.base import (
    CANCELLED_CODE,
    CHUNK_OVERHEAD,
    EXECUTING,
    CancelOutcome,
    ChunkEvent,
    EndEvent,
    NewRequest,
    RequestRecord,
    SidStats,
    Storage,
    StorageRefused,
    StorageUnavailable,
    status_for_code,
)
from spirit_gpu.gateway.storage.nats import names, server
from spirit_gpu.gateway.storage.nats.jsapi import JetStreamCalls
from spirit_gpu.gateway.storage.nats.names import Doc, decode, encode
from spirit_gpu.gateway.storage.nats.pulls import Delivery, Puller
from spirit_gpu.gateway.storage.nats.wire import Wire
from spirit_gpu.log import logger

P = ParamSpec("P")
R = TypeVar("R")

_CAS_TRIES = 50
_WRONG_LAST = (10071, 10164)  # JetStream: wrong last sequence (compare-and-set lost)
_REPLICAS_NOT_CLUSTERED = 10074  # JetStream: replicas > 1 not supported in non-clustered mode
_RECHECK = 1.0  # a sync waiter re-reads its record this often (lost wake-ups, outages)
_STREAM_POLL = 0.2
_KNOWN_MAX = 100_000
_ENDED_MAX = 4096  # requests this replica ended, kept for get_ended
_ENDED_BYTES = 32 * 1024 * 1024  # ... and their inline results, at most
_WRITE_BEHIND = 0.1  # seconds a delivery or start waits to be written with what follows
_CLOSE_WRITES = 5.0  # seconds a closing replica waits for its writes in flight
_SWEEP_LIST_AT = 16  # serverless ids without workers past which a sweep lists consumers
_LIST_PAGE = 256  # consumers in one JetStream CONSUMER.LIST answer
_BATCH_MAX = 64  # deliveries fetched in one pull for a link filling a batch
_BEHIND_FRESH = 0.01  # seconds a delivery's "none queued behind me" is believed
_PATIENCE = 10.0  # seconds a submit retries through an outage before answering 500
_DECLARE_PATIENCE = 30.0
_HOLD_MAX_MS = 120_000  # a delivery not recorded after this long is left to its lease
_SEQ_HEADER = "Spirit-Seq"
_cancel_note = msgspec.json.Encoder()


class _CancelNote(msgspec.Struct):
    origin: str
    ids: list[str]


_cancel_decode = msgspec.json.Decoder(_CancelNote).decode
_OUTAGE = (nats.errors.Error, TimeoutError, OSError)


def _time_to_read(fut: asyncio.Future[Doc | None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _guarded(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """NATS trouble (restarting, unreachable) surfaces as StorageUnavailable."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except _OUTAGE as exc:
            raise StorageUnavailable(f"NATS did not answer: {exc!r}") from exc

    return wrapper


@dataclass(eq=False)
class _Held:
    """A delivery and/or start noted here and not written yet."""

    sid: str
    claim: Doc | None = None  # the delivered job (holder, ack subject, sequence)
    started_at: int = 0
    # handed over here on its first delivery: most likely it has no record yet, so
    # the next write may compare against "none" without reading first (once: a
    # compare that fails reads)
    fresh: bool = False
    timer: asyncio.TimerHandle | None = None
    since: int = field(default_factory=lambda: int(time.time() * 1000))
    kept: asyncio.Future[None] | None = None  # done once written (``written``)

    def settle(self) -> None:
        """Written (or overtaken: ended, handed back, given up on)."""
        if self.kept is not None and not self.kept.done():
            self.kept.set_result(None)

    def apply(self, doc: Doc) -> None:
        if self.claim is not None:
            doc.delivered = True
            doc.delivered_at = self.claim.delivered_at
            doc.holder = self.claim.holder
            doc.ack = self.claim.ack
            doc.deliveries += 1
            doc.sequence = doc.sequence or self.claim.sequence
        if self.started_at:
            doc.delivered = True
            doc.started_at = doc.started_at or self.started_at
            doc.status = EXECUTING


class NatsStorage(Storage):
    waits_on_network = True
    outlives_gateway = True

    def __init__(self, urls: list[str], lease_seconds: float = 20.0,
                 retention_seconds: float = 1800.0, max_deliveries: int = 3,
                 ttl_max_seconds: float = 86400.0, replicas: int = 1,
                 max_chunk_bytes: int = 10 * 1024 * 1024,
                 clock: Callable[[], float] = time.time) -> None:
        self.urls = urls
        self.lease = lease_seconds
        self.retention = retention_seconds
        self.max_deliveries = max_deliveries
        self.ttl_max = ttl_max_seconds
        self.stream_replicas = replicas
        self.max_chunk_bytes = max_chunk_bytes
        self._chunk_bytes: dict[str, int] = {}  # stream bytes counted per request, here
        self._stopping = False  # stop_waiting() was called
        self.clock = clock
        self.replica = uuid.uuid4().hex[:12]
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._wire: Wire | None = None
        self._calls: JetStreamCalls | None = None
        self._blobs: ObjectStore | None = None
        self.blob_at = 900 * 1024
        self._consumers: set[str] = set()
        self._pullers: dict[str, Puller] = {}  # sid -> its pulls from here
        self._waiting: dict[str, list[asyncio.Future[Doc | None]]] = {}
        self._seen: dict[str, dict[str, float]] = {}  # sid -> worker -> last seen (ms)
        self._touched: dict[tuple[str, str], float] = {}
        self._subs: list[Subscription] = []
        # the last record this replica wrote, and its revision: the base of its next
        # compare-and-set (one round trip instead of read + write; a stale base just
        # fails the compare and is read again)
        self._known: dict[str, tuple[Doc, int]] = {}
        # the terminal records this replica wrote, newest last (get_ended: a worker's
        # webhook call right after its result reads them here, not from the stream)
        self._ended: OrderedDict[str, Doc] = OrderedDict()
        self._ended_bytes = 0
        self._claims: dict[str, asyncio.Task[None]] = {}  # take's record writes in flight
        self._early: dict[str, asyncio.Future[Doc | None]] = {}  # sync submits' wake-ups
        # per sid, how many more were queued behind the last delivery (its metadata
        # says) and when: a caller that will not wait right after is answered "none"
        # without a round trip when that was 0 (a link filling a batch; what came
        # meanwhile goes to its next waiting pull)
        self._behind: dict[str, tuple[int, float]] = {}
        self._held: dict[str, _Held] = {}
        self._writing: dict[str, _Held] = {}  # taken from _held, being written
        self._tasks: set[asyncio.Task[None]] = set()

    def _now(self) -> int:
        return int(self.clock() * 1000)

    @property
    def nc(self) -> Client:
        assert self._nc is not None, "NatsStorage.start() first"
        return self._nc

    @property
    def wire(self) -> Wire:
        assert self._wire is not None, "NatsStorage.start() first"
        return self._wire

    @property
    def calls(self) -> JetStreamCalls:
        assert self._calls is not None, "NatsStorage.start() first"
        return self._calls

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None, "NatsStorage.start() first"
        return self._js

    # --- life --------------------------------------------------------------------
    async def start(self) -> None:
        self._nc = await server.connect(self.urls, f"spirit-gateway-{self.replica}")
        try:
            self._js = self.nc.jetstream(timeout=5.0)
            self._wire = Wire(self.urls, f"spirit-gateway-{self.replica}-wire",
                              known=lambda: server.known_urls(self.nc, self.urls))
            try:
                await self._wire.connect()
            except nats.errors.Error as exc:
                raise StorageRefused(f"cannot connect to NATS at {server.shown_all(self.urls)}: "
                                     f"{exc!r}") from exc
            self._calls = JetStreamCalls(self._wire, timeout=5.0)
            await self._calls.start()
            await server.check(self.nc, self.js)
            self._blobs = await self._declare()
            self.blob_at = max(1024, self.nc.max_payload - 64 * 1024)
            self.wire.subscribe(names.done(self.replica), self._on_done)
            self._subs.append(await self.nc.subscribe(names.CANCEL_SUBJECT, cb=self._on_cancel))
            self._subs.append(await self.js.subscribe(
                "spirit.workers.>", cb=self._on_presence, ordered_consumer=True,
                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT))
        except BaseException:
            if self._wire is not None:
                await self._wire.close()
            await self.nc.close()
            raise

    async def _declare(self) -> ObjectStore:
        """Declare the streams; a cluster still forming (no peers for R3 yet) is waited
        for up to ``_DECLARE_PATIENCE`` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _DECLARE_PATIENCE
        while True:
            try:
                return await server.declare(
                    self.js, lease=self.lease, retention=self.retention,
                    ttl_max=self.ttl_max, replicas=self.stream_replicas)
            except (*_OUTAGE, APIError) as exc:
                why = (f"{type(exc).__name__}: {exc.description}"
                       if isinstance(exc, APIError) and exc.description else repr(exc))
                if isinstance(exc, APIError) and exc.err_code == _REPLICAS_NOT_CLUSTERED:
                    raise StorageRefused(
                        f"--store-replicas {self.stream_replicas} needs a NATS cluster of at "
                        f"least {self.stream_replicas} nodes; this server is not in one "
                        f"({why}): leave it at 1 with one server") from exc
                if loop.time() > deadline:
                    raise StorageRefused(f"NATS streams cannot be created: {why}") from exc
                logger.warn(f"NATS store: streams not created yet ({why}); retrying")
                await asyncio.sleep(0.5)

    async def close(self) -> None:
        for futs in self._waiting.values():
            for fut in futs:
                fut.cancel()
        self._waiting.clear()
        if self._calls is not None:
            await self._calls.close()
        for puller in self._pullers.values():
            await puller.close()
        if self._wire is not None:
            await self._wire.close()
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(*_OUTAGE):
                await asyncio.wait_for(self._nc.drain(), 5.0)
            if not self._nc.is_closed:
                with contextlib.suppress(*_OUTAGE):
                    await self._nc.close()

    # --- records -------------------------------------------------------------------
    async def _base(self, sid: str, request_id: str, settle: bool = True,
                    overlay: bool = True) -> tuple[Doc | None, int]:
        """What to compare-and-set against: this replica's last write, else a read,
        with what is held here to be written behind. ``settle``: first wait for this
        replica's writes in flight (not from one of them)."""
        if settle:
            await self._settled(request_id)
        known = self._known.pop(request_id, None)
        held = self._held.get(request_id)
        if known is not None:
            doc: Doc | None = msgspec.structs.replace(known[0])
            last = known[1]
        elif held is not None and held.fresh and held.claim is not None:
            held.fresh = False
            doc, last = msgspec.structs.replace(held.claim), 0
        else:
            doc, last = await self._load(sid, request_id)
        return (self._overlay(request_id, doc) if overlay else doc), last

    async def _settled(self, request_id: str) -> None:
        """Wait for this replica's record write of a delivery (read your own writes)."""
        claim = self._claims.get(request_id)
        if claim is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(claim)

    async def _read(self, sid: str, request_id: str) -> tuple[Doc | None, int]:
        await self._settled(request_id)
        doc, last = await self._load(sid, request_id)
        return self._overlay(request_id, doc), last

    async def _load(self, sid: str, request_id: str) -> tuple[Doc | None, int]:
        """The record and its sequence (the compare-and-set base). A request with no
        record yet is still queued (or just delivered): its queued message stands for
        it, with base 0 (the first record write creates the subject)."""
        doc, last = await self._record(sid, request_id)
        if doc is not None or last:
            return doc, last
        m = await self.calls.last(names.JOBS, names.job(sid, request_id))
        if m is None:
            # ended meanwhile: its terminal record is written before its message goes
            return await self._record(sid, request_id)
        if not m.data:
            return None, 0
        return msgspec.structs.replace(decode(m.data), body=b"", sequence=m.seq), 0

    async def _record(self, sid: str, request_id: str) -> tuple[Doc | None, int]:
        m = await self.calls.last(names.REQ, names.record(sid, request_id))
        if m is None:
            return None, 0
        if not m.data:
            return None, m.seq
        return decode(m.data), m.seq

    async def _write(self, doc: Doc, last: int, ttl: float | None = None) -> bool:
        """Compare-and-set on the record's subject; False when someone wrote first."""
        hdrs = {Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(last)}
        if ttl is not None:
            hdrs[Header.MSG_TTL.value] = str(max(1, round(ttl)))
        if doc.body:
            doc = msgspec.structs.replace(doc, body=b"")
        try:
            seq, _ = await self.calls.publish(names.record(doc.sid, doc.request_id), encode(doc),
                                        headers=hdrs)
        except APIError as exc:
            self._known.pop(doc.request_id, None)
            if exc.err_code in _WRONG_LAST:
                return False
            raise
        if doc.terminal:
            self._known.pop(doc.request_id, None)
            self._drop_held(doc.request_id)  # (the terminal record was written over it)
            self._remember_ended(doc)
        else:
            if len(self._known) > _KNOWN_MAX:
                self._known.clear()
            self._known[doc.request_id] = (doc, seq)
        return True

    def _remember_ended(self, doc: Doc) -> None:
        ended = self._ended
        old = ended.pop(doc.request_id, None)
        if old is not None:
            self._ended_bytes -= len(old.result or b"")
        ended[doc.request_id] = msgspec.structs.replace(doc)
        self._ended_bytes += len(doc.result or b"")
        while len(ended) > _ENDED_MAX or self._ended_bytes > _ENDED_BYTES:
            _, dropped = ended.popitem(last=False)
            self._ended_bytes -= len(dropped.result or b"")

    async def _blob_put(self, name: str, data: bytes) -> None:
        assert self._blobs is not None
        await self._blobs.put(name, data)

    async def _blob_get(self, name: str) -> bytes:
        assert self._blobs is not None
        res = await self._blobs.get(name)
        return res.data or b""

    async def _reply(self, subject: str, verb: bytes) -> None:
        """Ack (or nak, term) a delivery; while the lean connection reconnects, through
        the main one, which keeps it for after its own reconnect."""
        if not subject:
            return
        if self.wire.connected:
            self.wire.publish(subject, verb)
        else:
            await self.nc.publish(subject, verb)

    async def _end(self, sid: str, request_id: str, status_code: int, message: str,
                   result: bytes | None, by_gateway: bool, doc: Doc | None = None,
                   last: int = 0) -> Doc | None:
        """Turn the request terminal (first writer wins); None when it already was."""
        blob = ""
        if result is not None and len(result) > self.blob_at:
            blob = f"r-{request_id}"
            await self._blob_put(blob, result)
            result = None
        for _ in range(_CAS_TRIES):
            if doc is None:
                doc, last = await self._base(sid, request_id)
                if doc is None:
                    return None
            if doc.terminal:
                held = self._drop_held(request_id)
                if held is not None and held.claim is not None:  # release our delivery
                    await self._reply(held.claim.ack, b"+ACK")
                return None
            doc.status = status_for_code(status_code)
            doc.status_code = status_code
            doc.message = message
            doc.result = result
            doc.result_blob = blob
            doc.finished_at = self._now()
            doc.ended_by_gateway = by_gateway
            if await self._write(doc, last, ttl=self.retention):
                break
            doc = None
        else:
            raise StorageUnavailable(f"record of {request_id} kept changing")
        self._chunk_bytes.pop(request_id, None)
        # the waiting client first (it is on the critical path), then the delivery
        if doc.waiter == self.replica:
            self._wake(doc)
        elif doc.waiter and self.wire.connected:  # (else its waiter's re-read finds it)
            self.wire.publish(names.done(doc.waiter), encode(doc))
        if doc.ack:  # release the delivery: done, or never to run again
            await self._reply(doc.ack, b"+TERM" if by_gateway else b"+ACK")
        elif not doc.delivered and doc.sequence:
            with contextlib.suppress(*_OUTAGE):
                await self.js.delete_msg(names.JOBS, doc.sequence)
        if self.on_finish is not None:
            self.on_finish(doc)
        return doc

    def _replayed(self, doc: Doc) -> bool:
        """A delivery sooner than a lease after the last one, or after the start, cannot
        be a lease running out: the stream replayed it (a leader change)."""
        if not doc.delivered or not doc.delivered_at:
            return False
        since = max(doc.delivered_at, doc.started_at)
        return self._now() - since < self.lease * 800  # (a lease, less the delivery's trip)

    def _expired(self, doc: Doc) -> bool:
        return (not doc.terminal and not doc.started_at
                and self._now() - doc.enqueued_at > doc.ttl_ms)

    async def _expire(self, doc: Doc, last: int) -> Doc | None:
        return await self._end(doc.sid, doc.request_id, 408, "request timeout: queued longer "
                               f"than its ttl ({doc.ttl_ms} ms)", None, True, doc, last)

    async def _resolved(self, doc: Doc) -> Doc:
        if doc.result_blob and doc.result is None:
            doc.result = await self._blob_get(doc.result_blob)
        return doc

    # --- public API side ------------------------------------------------------------
    @_guarded
    async def submit(self, req: NewRequest) -> RequestRecord:
        await self._consumer(req.sid)  # so that the queue length counts it at once
        at = self._now()
        rid = str(uuid.uuid4())
        doc = Doc(request_id=rid, sid=req.sid, mode=req.mode, sequence=0, body=req.body,
                  webhook=req.webhook, created_at=at, enqueued_at=at, ttl_ms=req.ttl_ms,
                  waiter=self.replica if req.mode == "sync" else "")
        job = doc
        if len(req.body) > self.blob_at:
            doc.body_blob = f"b-{rid}"
            await self._blob_put(doc.body_blob, req.body)
            job = msgspec.structs.replace(doc, body=b"")
        payload = encode(job)
        if req.mode == "sync":  # the client waits next: be ready for the wake-up now
            fut: asyncio.Future[Doc | None] = asyncio.get_running_loop().create_future()
            self._early[rid] = fut
            self._waiting.setdefault(rid, []).append(fut)
        try:
            return await self._publish_job(req, doc, payload)
        except BaseException:
            if self._early.pop(rid, None) is not None:
                self._waiting.pop(rid, None)
            raise

    async def _publish_job(self, req: NewRequest, doc: Doc, payload: bytes) -> Doc:
        rid = doc.request_id
        # Nats-Msg-Id: publishing again (a retry through an election or a reconnect)
        # does not queue it twice
        seq, _ = await self._patiently(lambda: self.calls.publish(
            names.job(req.sid, rid), payload, headers={Header.MSG_ID.value: rid}))
        doc.sequence = seq
        # The queued message holds the whole record: from here the request is safe.
        # Its record is first written when it ends or has run a while (``_hold``):
        # until then reads find the message (``_load``).
        return doc

    async def _patiently(self, call: Callable[[], Coroutine[Any, Any, R]]) -> R:
        """Retry an idempotent call through a short outage (a leader election, a
        reconnect) for up to ``_PATIENCE`` s, then let the error out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _PATIENCE
        pause = 0.05
        while True:
            try:
                return await call()
            except _OUTAGE:
                if loop.time() + pause > deadline:
                    raise
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)

    @_guarded
    async def get(self, sid: str, request_id: str) -> RequestRecord | None:
        doc, last = await self._read(sid, request_id)
        if doc is None:
            return None
        if self._expired(doc) and not doc.delivered:
            ended = await self._expire(doc, last)
            if ended is None:
                return await self.get(sid, request_id)
            doc = ended
        return await self._resolved(doc)

    @_guarded
    async def get_ended(self, sid: str, request_id: str) -> RequestRecord | None:
        doc = self._ended.get(request_id)
        if (doc is None or doc.sid != sid
                or self._now() - doc.finished_at > self.retention * 1000):
            return await self.get(sid, request_id)  # (past retention: the stream says 404)
        return await self._resolved(msgspec.structs.replace(doc))

    @_guarded
    async def wait_done(self, sid: str, request_id: str, wait: float) -> RequestRecord | None:
        """Woken by ``_wake`` (the result was stored here, or a note came on the done
        subject); every ``_RECHECK`` s it reads the record (a wake-up lost in an outage).
        A wake-up future resolves to the record, or to None when it is time to read."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        early = self._early.pop(request_id, None)  # registered by submit: no first read
        if self._stopping:
            return None
        futs = self._waiting.setdefault(request_id, [])
        fut: asyncio.Future[Doc | None] = early or loop.create_future()
        if early is None:
            futs.append(fut)
        try:
            if early is None:
                rec = await self.get(sid, request_id)
                if rec is None or rec.terminal:
                    return rec
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    return None
                timer = loop.call_later(min(left, _RECHECK), _time_to_read, fut)
                try:
                    doc = await fut
                finally:
                    timer.cancel()
                if doc is not None:
                    return await self._resolved(doc)
                if self._stopping:
                    return None
                # the next wake-up's future before the read: one that comes while
                # reading is not lost
                futs.remove(fut)
                fut = loop.create_future()
                futs.append(fut)
                rec = await self.get(sid, request_id)
                if rec is None or rec.terminal:
                    return rec
        finally:
            if fut in futs:
                futs.remove(fut)
            if not futs:
                self._waiting.pop(request_id, None)

    def _on_done(self, _subject: str, _reply: str, _headers: bytes, data: bytes) -> None:
        try:
            doc = decode(data)
        except msgspec.DecodeError:
            return
        self._wake(doc)

    def _wake(self, doc: Doc) -> None:
        for fut in self._waiting.get(doc.request_id, ()):
            if not fut.done():
                fut.set_result(doc)

    def stop_waiting(self) -> None:
        self._stopping = True
        for futs in self._waiting.values():
            for fut in futs:
                _time_to_read(fut)
        for puller in self._pullers.values():  # workers' long-polls: no job
            puller.stop()

    async def stream(self, sid: str, request_id: str) -> AsyncIterator[ChunkEvent | EndEvent]:
        try:
            doc, _ = await self._load(sid, request_id)
            if doc is None:
                return
            sub = await self.js.subscribe(names.chunks(sid, request_id), ordered_consumer=True)
        except _OUTAGE as exc:
            raise StorageUnavailable(f"NATS did not answer: {exc!r}") from exc
        try:
            terminal = doc if doc.terminal else None
            last: int | None = None
            delivered = 0
            seen: set[int] = set()
            while True:
                if terminal is not None and last is None:
                    last = await self._last_chunk(sid, request_id)
                if terminal is not None and last is not None and delivered >= last:
                    yield EndEvent(status_code=terminal.status_code, status=terminal.status)
                    return
                try:
                    msg = await sub.next_msg(timeout=_STREAM_POLL)
                except nats.errors.TimeoutError:
                    if terminal is None:
                        now, _ = await self._load(sid, request_id)
                        if now is None:
                            return
                        if now.terminal:
                            terminal = now
                    continue
                delivered = msg.metadata.sequence.stream
                seq = int((msg.headers or {}).get(_SEQ_HEADER, "0"))
                if seq in seen:
                    continue
                seen.add(seq)
                blob = (msg.headers or {}).get(names.BLOB_HEADER)
                data = await self._blob_get(blob) if blob else msg.data
                yield ChunkEvent(seq=seq, data=data)
        finally:
            with contextlib.suppress(*_OUTAGE):
                await sub.unsubscribe()

    async def _last_chunk(self, sid: str, request_id: str) -> int:
        m = await self.calls.last(names.CHUNKS, names.chunks(sid, request_id))
        return 0 if m is None else m.seq

    @_guarded
    async def cancel(self, sid: str, request_id: str, sequence: int | None,
                     code: int = CANCELLED_CODE, message: str = "cancelled") -> CancelOutcome:
        for _ in range(_CAS_TRIES):
            doc, last = await self._base(sid, request_id)
            if doc is None:
                return CancelOutcome.NOT_FOUND
            if sequence is not None and sequence != doc.sequence:
                return CancelOutcome.SEQUENCE_MISMATCH
            if doc.terminal:
                return CancelOutcome.ALREADY_FINISHED
            running = doc.delivered
            if await self._end(sid, request_id, code, message, None, True, doc, last) is None:
                continue  # changed meanwhile: look again
            if running:
                await self.nc.publish(names.CANCEL_SUBJECT, _cancel_note.encode(
                    _CancelNote(origin=self.replica, ids=[request_id])))
                return CancelOutcome.CANCELLED_RUNNING
            return CancelOutcome.CANCELLED_QUEUED
        raise StorageUnavailable(f"record of {request_id} kept changing")

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            note = _cancel_decode(msg.data)
        except msgspec.DecodeError:
            return
        if note.origin != self.replica and self.on_remote_cancel is not None:
            self.on_remote_cancel(note.ids)

    @_guarded
    async def clean_queued(self, sid: str, mode: str) -> list[str]:
        cleaned: list[str] = []
        seq = 1
        while True:
            try:
                m = await self.js.get_msg(names.JOBS, seq=seq, subject=names.jobs(sid),
                                          next=True)
            except NotFoundError:
                break
            seq = (m.seq or seq) + 1
            if not m.data:
                continue
            job = decode(m.data)
            if job.mode != mode:
                continue
            doc, last = await self._record(sid, job.request_id)
            if doc is None:
                doc = msgspec.structs.replace(job, body=b"", sequence=m.seq or 0)
            if doc.terminal or doc.delivered:
                continue
            if await self._end(sid, doc.request_id, CANCELLED_CODE, "cancelled: queue cleaned",
                               None, True, doc, last) is not None:
                cleaned.append(doc.request_id)
        return cleaned

    @_guarded
    async def queue_length(self, sid: str) -> int:
        await self._consumer(sid)
        try:
            info = await self.js.consumer_info(names.JOBS, names.consumer(sid))
        except NotFoundError:
            return 0
        return self._counts(sid, info)[0]

    def _counts(self, sid: str, info: ConsumerInfo) -> tuple[int, int]:
        """(queued, in flight) from the sid's consumer. With no worker present no job is
        held: those handed out and not acked (a lease that ran out, a job put back)
        wait to be delivered again, which the server counts apart from num_pending."""
        queued, handed = int(info.num_pending or 0), int(info.num_ack_pending or 0)
        return (queued, handed) if self._present(sid) else (queued + handed, 0)

    def _present(self, sid: str) -> int:
        at = self._now()
        lease_ms = self.lease * 1000
        return sum(1 for t in self._seen.get(sid, {}).values() if at - t <= lease_ms)

    async def worker_count(self, sid: str) -> int:
        return self._present(sid)

    async def ever_had_worker(self, sid: str) -> bool | None:
        # every replica hears every worker's presence from its own start on
        return sid in self._seen

    async def _on_presence(self, msg: Msg) -> None:
        parts = msg.subject.split(".")
        if len(parts) < 4:
            return
        sid, worker = ".".join(parts[2:-1]), parts[-1]
        try:
            seen = float(msg.data)
        except ValueError:
            return
        workers = self._seen.setdefault(sid, {})
        workers[worker] = max(seen, workers.get(worker, 0.0))

    @_guarded
    async def stats(self) -> list[SidStats]:
        out = []
        prefix = len("spirit.jobs.")
        async for page in self._consumer_pages():
            for info in page:
                subject = info.config.filter_subject or ""
                sid = subject[prefix:].removesuffix(".*")
                queued, in_flight = self._counts(sid, info)
                out.append(SidStats(sid=sid, queued=queued, in_flight=in_flight,
                                    workers=self._present(sid)))
        return sorted(out, key=lambda s: s.sid)

    async def _consumer_pages(self) -> AsyncGenerator[list[ConsumerInfo], None]:
        """Every serverless id's consumer on the jobs stream, a page (256) at a time."""
        offset = 0
        while True:
            page = await self.js.consumers_info(names.JOBS, offset)
            yield page
            offset += len(page)
            if len(page) < _LIST_PAGE:
                return

    # --- worker side ---------------------------------------------------------------------
    async def _consumer(self, sid: str) -> None:
        if sid not in self._consumers:
            await server.ensure_consumer(self.js, sid, self.lease)
            self._consumers.add(sid)

    async def _next(self, sid: str, wait: float, batch: int = 1) -> list[Delivery]:
        """Up to ``batch`` deliveries from the sid's consumer, waiting up to ``wait`` s
        for the first."""
        if wait <= 0.01:
            behind, at = self._behind.get(sid, (1, 0.0))
            if not behind and time.monotonic() - at < _BEHIND_FRESH:
                return []
            req: dict[str, object] = {"batch": batch, "no_wait": True}
            timeout = 5.0
        else:
            req = {"batch": batch, "expires": int(wait * 1e9)}
            timeout = wait + 5.0
        puller = self._pullers.get(sid)
        if puller is None:
            puller = Puller(self.wire, f"$JS.API.CONSUMER.MSG.NEXT.{names.JOBS}."
                                       f"{names.consumer(sid)}")
            await puller.start()
            if sid in self._pullers:  # another caller made one meanwhile
                await puller.close()
            puller = self._pullers.setdefault(sid, puller)
        got, trouble = await puller.pull(req, batch, timeout)
        self._behind[sid] = (got[-1].pending if got else 0, time.monotonic())
        if not got and trouble and wait > 0.01:  # no busy loop while the stream elects
            await asyncio.sleep(min(wait, 0.5))
        return got

    async def take(self, sid: str, worker: str, wait: float) -> RequestRecord | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (0.0 if self._stopping else wait)
        try:
            await self.touch_worker(sid, worker)
            await self._consumer(sid)
            while True:
                msgs = await self._next(sid, deadline - loop.time())
                if not msgs:
                    return None
                rec = await self._deliver(sid, worker, msgs[0])
                if rec is not None:
                    return rec
        except _OUTAGE as exc:
            # a worker asking during an outage hears "nothing now" after its wait
            logger.warn(f"NATS store: take for {sid} failed: {exc!r}")
            await asyncio.sleep(max(0.0, min(deadline - loop.time(), 1.0)))
            return None

    async def take_more(self, sid: str, worker: str, n: int) -> list[RequestRecord]:
        """One pull for up to ``n`` (no more: nothing is fetched that the link cannot
        take now, so nothing goes back to be delivered again)."""
        out: list[RequestRecord] = []
        msgs: list[Delivery] = []
        try:
            msgs = await self._next(sid, 0, min(n, _BATCH_MAX))
            while msgs:
                rec = await self._deliver(sid, worker, msgs[0])
                msgs.pop(0)
                if rec is not None:
                    out.append(rec)
        except _OUTAGE as exc:
            logger.warn(f"NATS store: take for {sid} failed: {exc!r}")
            for msg in msgs:  # not handed over: back to the queue now, not after a lease
                with contextlib.suppress(*_OUTAGE):
                    await self._reply(msg.reply, b"-NAK")
        return out

    async def _deliver(self, sid: str, worker: str, msg: Delivery) -> Doc | None:
        rec = self._hand_over(sid, worker, msg)
        if rec is None:
            return await self._claim(sid, worker, msg)
        if rec.body_blob:
            rec.body = await self._blob_get(rec.body_blob)
        return rec

    def _hand_over(self, sid: str, worker: str, msg: Delivery) -> Doc | None:
        """A first delivery within its TTL goes out at once; its record is written
        meanwhile (what acts on it next here waits for that write). A cancel that
        came first is found by that write, and the worker told to stop."""
        job = decode(msg.data)
        if msg.delivered != 1 or self._expired(job):
            return None
        job.sequence = msg.sequence
        job.delivered = True
        job.delivered_at = self._now()
        job.holder = worker
        job.deliveries = 1
        job.ack = msg.reply
        rid = job.request_id
        held = self._hold(sid, rid)
        held.claim = msgspec.structs.replace(job, body=b"", deliveries=0)
        held.fresh = True
        return job

    def _in_background(self, rid: str, write: Coroutine[Any, Any, None]) -> None:
        """Run a record write after this replica's earlier ones for ``rid``; what reads
        or writes ``rid`` here next waits for it (``_settled``)."""
        before = self._claims.get(rid)

        async def chained() -> None:
            if before is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(before)
            await write

        task = asyncio.create_task(chained())
        self._claims[rid] = task

        def forget(t: asyncio.Task[None]) -> None:
            if self._claims.get(rid) is t:
                del self._claims[rid]
        task.add_done_callback(forget)

    # --- write-behind of deliveries and starts ----------------------------------------
    def _hold(self, sid: str, request_id: str) -> _Held:
        """Note a delivery or a start, written ``_WRITE_BEHIND`` s later in one write:
        a job that ends sooner is written once, by its result. Until then reads and
        writes here see it (``_overlay``)."""
        held = self._held.get(request_id)
        if held is None:
            held = self._held[request_id] = _Held(sid)
            held.timer = asyncio.get_running_loop().call_later(
                _WRITE_BEHIND, self._flush_held, request_id)
        return held

    def _flush_held(self, request_id: str) -> None:
        held = self._held.pop(request_id, None)
        if held is not None:
            if held.timer is not None:
                held.timer.cancel()  # (written now: before its time, by drain)
            self._writing[request_id] = held
            self._in_background(request_id, self._held_write(request_id, held))

    async def drain(self) -> None:
        """Shutting down: deliveries and starts waiting to be written behind are written
        now, and this replica's writes in flight awaited (up to ``_CLOSE_WRITES`` s): a
        job whose start went unwritten could be handed out again after a restart."""
        for request_id in list(self._held):
            self._flush_held(request_id)
        if self._claims:
            await asyncio.wait(list(self._claims.values()), timeout=_CLOSE_WRITES)

    def _drop_held(self, request_id: str) -> _Held | None:
        held = self._held.pop(request_id, None)
        if held is not None:
            if held.timer is not None:
                held.timer.cancel()
            held.settle()
        return held

    def written(self, request_id: str) -> asyncio.Future[None] | None:
        held = self._held.get(request_id) or self._writing.get(request_id)
        if held is None:
            return None
        if held.kept is None:
            held.kept = asyncio.get_running_loop().create_future()
        return held.kept

    def _overlay(self, request_id: str, doc: Doc | None) -> Doc | None:
        held = self._held.get(request_id)
        if held is None or (doc is not None and doc.terminal):
            return doc
        if doc is None:
            if held.claim is None:
                return None
            doc = msgspec.structs.replace(held.claim)
        held.apply(doc)
        return doc

    async def _held_write(self, request_id: str, held: _Held) -> None:
        try:
            await self._held_write_once(request_id, held)
        finally:
            if self._writing.get(request_id) is held:
                del self._writing[request_id]
            if self._held.get(request_id) is not held:  # (not held again to retry)
                held.settle()

    async def _held_write_once(self, request_id: str, held: _Held) -> None:
        try:
            for _ in range(_CAS_TRIES):
                doc, last = await self._base(held.sid, request_id, settle=False, overlay=False)
                if doc is None:
                    if held.claim is None:
                        return
                    doc, last = msgspec.structs.replace(held.claim), 0
                if doc.terminal:  # ended before it was written (cancelled): stop the worker
                    if held.claim is not None:
                        await self._reply(held.claim.ack, b"+TERM" if doc.ended_by_gateway
                                          else b"+ACK")
                        if doc.ended_by_gateway and self.on_remote_cancel is not None:
                            self.on_remote_cancel([request_id])
                    return
                held.apply(doc)
                if await self._write(doc, last):
                    return
        except _OUTAGE as exc:
            # NATS is electing or reconnecting: keep it held and try again (a delivery
            # not recorded would look never started if the stream replays it)
            if request_id not in self._held and self._now() - held.since < _HOLD_MAX_MS:
                logger.warn(f"NATS store: recording the delivery of {request_id} failed "
                            f"({exc!r}); retrying")
                self._held[request_id] = held
                held.timer = asyncio.get_running_loop().call_later(
                    0.5, self._flush_held, request_id)
            else:
                logger.warn(f"NATS store: recording the delivery of {request_id} failed: "
                            f"{exc!r}")

    async def _claim(self, sid: str, worker: str | None, msg: Delivery) -> Doc | None:
        """Hand ``msg`` to ``worker`` unless its record says otherwise (ended, past its
        TTL, lost while running, delivered too often). ``worker`` None: a sweep's probe,
        which settles lost deliveries and puts everything else back."""
        job = decode(msg.data)
        job.sequence = msg.sequence
        rid = job.request_id
        held = self._held.get(rid)
        if held is not None and held.claim is not None:
            # delivered again while held here (a stream leader change replays
            # deliveries): the worker has it; keep the newest ack subject
            held.claim.ack = msg.reply or held.claim.ack
            return None
        for _ in range(_CAS_TRIES):
            doc, last = await self._base(sid, rid)
            if doc is None:
                doc = msgspec.structs.replace(job, body=b"")
            if doc.terminal:
                await self._reply(msg.reply, b"+ACK")
                return None
            if doc.delivered and not doc.ack and doc.holder:
                # adopted (adopt): its worker has it; from now on its lease can be extended
                doc.ack = msg.reply
                if not await self._write(doc, last):
                    continue
                return None
            if self._replayed(doc):  # the same, written already (maybe by another replica)
                doc.ack = msg.reply or doc.ack
                if not await self._write(doc, last):
                    continue
                return None
            if self._expired(doc):
                doc.ack = msg.reply
                if await self._expire(doc, last) is None:
                    continue
                return None
            if doc.started_at or doc.deliveries >= self.max_deliveries:
                what = "while executing" if doc.started_at else \
                    f"after {doc.deliveries} deliveries that never started"
                doc.ack = msg.reply
                if await self._end(sid, rid, 500, f"worker lost: no sign of life for "
                                   f"{self.lease:g} s {what} (the worker crashed, was killed "
                                   "or lost its connection)", None, True, doc, last) is None:
                    continue
                return None
            if worker is None:
                if doc.delivered:  # its lease ran out before it started: queued again
                    doc.delivered_at = 0
                    doc.delivered = False
                    doc.holder = ""
                    doc.ack = ""
                    if not await self._write(doc, last):
                        continue
                await self._reply(msg.reply, b"-NAK")
                return None
            doc.delivered = True
            doc.delivered_at = self._now()
            doc.holder = worker
            doc.deliveries += 1
            doc.ack = msg.reply
            if await self._write(doc, last):
                break
        else:
            raise StorageUnavailable(f"record of {rid} kept changing")
        doc.body = await self._blob_get(job.body_blob) if job.body_blob else job.body
        return doc

    @_guarded
    async def give_back(self, sid: str, request_id: str) -> None:
        held = self._held.get(request_id)
        if held is not None and held.claim is not None and not held.started_at:
            self._drop_held(request_id)  # never written: hand the delivery back, that is all
            await self._reply(held.claim.ack, b"-NAK")
            return
        for _ in range(_CAS_TRIES):
            doc, last = await self._base(sid, request_id)
            if doc is None or doc.terminal or not doc.delivered or doc.started_at:
                return
            ack = doc.ack
            doc.delivered = False
            doc.holder = ""
            doc.deliveries = max(0, doc.deliveries - 1)
            doc.ack = ""
            if await self._write(doc, last):
                await self._reply(ack, b"-NAK")
                return

    async def touch_worker(self, sid: str, worker: str) -> None:
        at = self._now()
        key = names.worker(sid, worker)
        if at - self._touched.get((sid, worker), 0.0) < self.lease * 250:  # lease/4, in ms
            return
        self._touched[(sid, worker)] = at
        self._seen.setdefault(sid, {})[key.rsplit(".", 1)[1]] = at
        with contextlib.suppress(*_OUTAGE):
            await self.nc.publish(key, str(at).encode())

    @_guarded
    async def adopt(self, sid: str, request_id: str, worker: str) -> bool:
        for _ in range(_CAS_TRIES):
            doc, last = await self._base(sid, request_id)
            if doc is None or doc.terminal:
                return False
            if doc.delivered:
                return doc.holder == worker
            # handed out before: a record of a delivery whose lease ran out while no
            # replica heard from its worker (queued again, the start not written yet),
            # or no record and a consumer that passed the message. A job never handed
            # out (or handed back unused) is not the worker's: it is wrong.
            if not (doc.deliveries if last else await self._was_delivered(sid, doc.sequence)):
                return False
            at = self._now()
            doc.delivered = True
            doc.delivered_at = doc.started_at = at
            doc.holder = worker
            doc.deliveries = max(1, doc.deliveries)
            doc.ack = ""  # (learnt when the stream delivers it again: _claim)
            if await self._write(doc, last):
                logger.info(f"NATS store: {request_id} is running on {worker}, which reports "
                            "it; the replica that delivered it died before recording that",
                            request_id=request_id)
                return True
        return False

    async def _was_delivered(self, sid: str, sequence: int) -> bool:
        # a work queue's consumer delivers in stream order: what it has passed was handed out
        info = await self.js.consumer_info(names.JOBS, names.consumer(sid))
        return bool(sequence) and info.delivered.stream_seq >= sequence

    @_guarded
    async def mark_started(self, sid: str, request_id: str) -> bool:
        """Written behind (``_hold``): True means "noted", not "it was still running"."""
        held = self._hold(sid, request_id)
        held.started_at = held.started_at or self._now()
        return True

    @_guarded
    async def finish(self, sid: str, request_id: str, status_code: int, message: str,
                     result: bytes | None) -> bool:
        return await self._end(sid, request_id, status_code, message, result, False) is not None

    @_guarded
    async def annotate(self, sid: str, request_id: str, message: str) -> bool:
        for _ in range(_CAS_TRIES):
            doc, last = await self._read(sid, request_id)
            if doc is None or not doc.terminal:
                return False
            doc.message = message
            remaining = None
            if doc.finished_at:  # the record keeps the expiry it got when it ended
                remaining = max(1.0, self.retention - (self._now() - doc.finished_at) / 1000)
            if await self._write(doc, last, ttl=remaining):
                return True
        return False

    async def ack(self, sid: str, request_id: str) -> None:
        # the delivery is released when the result is stored; an ack without a result
        # leaves it to the lease (a failed metric with no result fails the job then)
        return None

    @_guarded
    async def add_chunk(self, sid: str, request_id: str, seq: int, data: bytes) -> bool:
        """The cap (``max_chunk_bytes``) is counted by the replica the chunks come
        through: a worker that relinks to another replica mid-stream starts a new
        count there."""
        doc = self._holding(request_id)
        if doc is None:
            doc, _ = await self._read(sid, request_id)
        if doc is None or doc.terminal:
            self._chunk_bytes.pop(request_id, None)
            return False
        cost = len(data) + CHUNK_OVERHEAD
        used = self._chunk_bytes.get(request_id, 0)
        if used + cost > self.max_chunk_bytes:
            return False
        if len(self._chunk_bytes) > _KNOWN_MAX:
            self._chunk_bytes.clear()
        self._chunk_bytes[request_id] = used + cost  # (counted before the publish: chunks
        # of one request may come concurrently over the plain agent API)
        hdrs = {Header.MSG_ID.value: f"{request_id}.{seq}", _SEQ_HEADER: str(seq)}
        if len(data) > self.blob_at:
            name = f"c-{request_id}-{seq}"
            await self._blob_put(name, data)
            hdrs[names.BLOB_HEADER] = name
            data = b""
        try:
            _, duplicate = await self.calls.publish(names.chunks(sid, request_id), data,
                                                    headers=hdrs)
        except BaseException:
            self._uncount(request_id, cost)
            raise
        if duplicate:
            self._uncount(request_id, cost)
        await self._reply(doc.ack, b"+WPI")
        return not duplicate

    def _uncount(self, request_id: str, cost: int) -> None:
        if request_id in self._chunk_bytes:
            self._chunk_bytes[request_id] -= cost

    def _holding(self, request_id: str) -> Doc | None:
        """What this replica knows of a request it delivered or wrote and that has not
        ended here (no read: a stream's chunks need none each)."""
        held = self._held.get(request_id)
        if held is not None and held.claim is not None:
            return held.claim
        known = self._known.get(request_id)
        return known[0] if known is not None else None

    @_guarded
    async def heartbeat(self, sid: str, worker: str, request_ids: list[str]) -> list[str]:
        await self.touch_worker(sid, worker)
        docs = await asyncio.gather(*(self._read(sid, r) for r in request_ids))
        cancel = []
        for doc, _ in docs:
            if doc is None:
                continue
            if doc.terminal:
                # (a worker asking about it holds it, even if the record missed that)
                if doc.ended_by_gateway:
                    cancel.append(doc.request_id)
            elif not doc.delivered:  # its delivery died with a replica: not run twice
                await self.adopt(sid, doc.request_id, worker)
            else:
                await self._reply(doc.ack, b"+WPI")
        return cancel

    @_guarded
    async def cancels_for(self, sid: str, request_ids: list[str]) -> list[str]:
        docs = await asyncio.gather(*(self._read(sid, r) for r in request_ids))
        return [d.request_id for d, _ in docs
                if d is not None and d.terminal and d.ended_by_gateway]

    async def _idle_infos(self, sids: list[str]) -> dict[str, ConsumerInfo]:
        """The consumer info of each of ``sids``: one call each for a few, else the jobs
        stream's consumer list, 256 a call (a replica that knows thousands of serverless
        ids without workers, scaled to zero, would ask that many times a sweep)."""
        out: dict[str, ConsumerInfo] = {}
        if len(sids) <= _SWEEP_LIST_AT:
            for sid in sids:
                try:
                    out[sid] = await self.js.consumer_info(names.JOBS, names.consumer(sid))
                except (*_OUTAGE, StorageUnavailable) as exc:
                    logger.warn(f"NATS store: sweep of {sid} failed: {exc!r}")
            return out
        wanted = {names.consumer(sid): sid for sid in sids}
        try:
            async with contextlib.aclosing(self._consumer_pages()) as pages:
                async for page in pages:
                    for info in page:
                        mine = wanted.get(info.name or "")
                        if mine is not None:
                            out[mine] = info
                    if len(out) == len(wanted):
                        break
        except (*_OUTAGE, StorageUnavailable) as exc:
            logger.warn(f"NATS store: sweep's consumer list failed: {exc!r}")
        return out

    async def sweep(self) -> None:
        """Leases and retention are kept by the server (ack-wait redelivery, message
        TTL); queued requests past their TTL end when next read or taken. A delivery
        whose lease ran out goes to the next pull; when no worker of the sid is
        alive or pulling, the sweep pulls it itself, so a job lost mid-run fails
        without waiting for a worker to come."""
        at = self._now()
        for workers in self._seen.values():
            for w in [w for w, t in workers.items() if at - t > 3000 * self.lease]:
                del workers[w]
        idle = [sid for sid in list(self._consumers) if not self._present(sid)]
        for sid, info in (await self._idle_infos(idle)).items():
            if not info.num_ack_pending or info.num_waiting:
                continue
            try:
                probed: set[int] = set()
                for _ in range(32):
                    msgs = await self._next(sid, 0)
                    if not msgs:
                        break
                    msg = msgs[0]
                    if msg.sequence in probed:  # put back by this probe: all were seen
                        await self._reply(msg.reply, b"-NAK")
                        break
                    await self._claim(sid, None, msg)
                    if msg.delivered == 1:  # (redeliveries come first: none are left)
                        break
                    probed.add(msg.sequence)
            except (*_OUTAGE, StorageUnavailable) as exc:
                logger.warn(f"NATS store: sweep of {sid} failed: {exc!r}")
