"""The storage interface the HTTP layer talks to, and the records crossing it.

Everything the gateway keeps (queues, leases, statuses, results, stream
chunks, worker presence) lives behind ``Storage``. ``MemoryStorage`` (memory.py)
is the embedded default; ``NatsStorage`` (nats/) keeps it in NATS JetStream so
that many replicas share it: ``submit`` -> a message on a work-queue stream per
serverless id; ``take`` -> a pull from its consumer (the delivery's ack-wait is
the lease, renewed by ``heartbeat``); statuses and results -> a record per
request, compare-and-set, kept for the retention by per-message TTL; ``sweep``
-> mostly server-side. docs/scaling.md says what is kept where.

Every accepted request reaches exactly one terminal state: the first
``finish`` wins and later ones are ignored (they return False).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Callable
from enum import Enum

import msgspec

# Public status names (GET /v1/<sid>/status).
QUEUEING = "queueing"
EXECUTING = "executing"
SUCCEED = "succeed"
FAILED = "failed"
CANCELLED = "cancelled"
TERMINAL = frozenset({SUCCEED, FAILED, CANCELLED})

CANCELLED_CODE = 499
CLIENT_GONE = "client closed the request"  # the message of a request its client left
# what one stored stream chunk costs beyond its data (record, list and set slots);
# counted toward the per-request chunk cap so that empty chunks are bounded too
CHUNK_OVERHEAD = 128

# A worker name with this prefix may stand for several processes (workers that
# send no id of their own, behind one address or one agent sidecar). Its signs
# of life (take, touch_worker, a heartbeat) renew none of its requests' leases:
# only a renewal naming the request does (a heartbeat listing it, a metric, a
# chunk). So a killed worker's request fails or is redelivered even while a
# neighbour under the same name keeps polling. Every Storage honours this.
SHARED_WORKER_PREFIX = "shared:"


def is_shared_worker(worker: str) -> bool:
    return worker.startswith(SHARED_WORKER_PREFIX)


def status_for_code(status_code: int) -> str:
    if 200 <= status_code < 300:
        return SUCCEED
    if status_code == CANCELLED_CODE:
        return CANCELLED
    return FAILED


class NewRequest(msgspec.Struct):
    """A client request accepted by the public API, before it is queued."""

    sid: str
    mode: str  # sync | async
    body: bytes  # the client's JSON, exactly as sent
    webhook: str
    ttl_ms: int


class RequestRecord(msgspec.Struct, gc=False):
    """One request's whole life. Times are epoch milliseconds.

    Untracked by the cyclic GC (it holds only strings, numbers and bytes, so it
    cannot be part of a cycle): thousands are kept for the retention time, and a
    full collection would otherwise scan each of them.
    """

    request_id: str
    sid: str
    mode: str
    sequence: int
    body: bytes
    webhook: str
    created_at: int
    enqueued_at: int
    ttl_ms: int
    status: str = QUEUEING
    delivered: bool = False  # handed to a worker (status stays queueing until it starts)
    holder: str = ""  # the worker it was handed to
    deliveries: int = 0
    started_at: int = 0
    finished_at: int = 0
    status_code: int = 0  # 0 until terminal
    message: str = ""
    result: bytes | None = None
    ended_by_gateway: bool = False  # cancelled / timed out / lease lost, not the worker's result

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def public_status(self) -> str:
        if self.status == QUEUEING and self.delivered:
            return EXECUTING
        return self.status


class ChunkEvent(msgspec.Struct, gc=False):
    seq: int
    data: bytes


class EndEvent(msgspec.Struct):
    status_code: int
    status: str


class CancelOutcome(Enum):
    NOT_FOUND = "not found"
    SEQUENCE_MISMATCH = "sequence mismatch"
    ALREADY_FINISHED = "already finished"
    CANCELLED_QUEUED = "cancelled while queued"
    CANCELLED_RUNNING = "cancelled while running"


class SidStats(msgspec.Struct):
    sid: str
    queued: int
    in_flight: int
    workers: int


FinishHook = Callable[[RequestRecord], None]
CancelHook = Callable[[list[str]], None]


class StorageRefused(Exception):
    """The store cannot start (unreachable, or lacking a feature); one line says why."""


class StorageUnavailable(Exception):
    """The store did not answer in time (e.g. NATS restarting); the client may retry."""


class Storage(abc.ABC):
    """All gateway state. Implementations must be safe for many concurrent callers."""

    on_finish: FinishHook | None = None  # called once per request, when it turns terminal
    # called with running requests cancelled through another replica (their link may be here)
    on_remote_cancel: CancelHook | None = None
    # its calls wait on the network (a round trip each): callers with many independent
    # calls to make (a link's frames) make them concurrently instead of one by one
    waits_on_network: bool = False
    # requests outlive this gateway process (kept elsewhere, readable through a replica)
    outlives_gateway: bool = False

    async def start(self) -> None:
        """Open connections, start background work."""
        return None

    async def drain(self) -> None:
        """A graceful shutdown, before ``close``: write now what is held to be written
        later (``close`` alone is as abrupt as the process dying)."""
        return None

    async def close(self) -> None:
        """Release everything; waiters get None."""
        return None

    # --- the public API side -------------------------------------------------
    @abc.abstractmethod
    async def submit(self, req: NewRequest) -> RequestRecord:
        """Queue a request; assigns its id and its per-sid sequence number."""

    @abc.abstractmethod
    async def get(self, sid: str, request_id: str) -> RequestRecord | None:
        """The request, or None when unknown or past retention."""

    async def get_ended(self, sid: str, request_id: str) -> RequestRecord | None:
        """Like ``get``, for a caller that reads only what a request's end fixes (its
        status, code, result, webhook, ``ended_by_gateway``; not its message, which a
        note can still change): a networked store answers a request it ended itself
        from memory, without a round trip."""
        return await self.get(sid, request_id)

    @abc.abstractmethod
    async def wait_done(self, sid: str, request_id: str, wait: float) -> RequestRecord | None:
        """The request once terminal; None when it is not terminal within ``wait`` s."""

    @abc.abstractmethod
    def stop_waiting(self) -> None:
        """The gateway is shutting down: every ``wait_done`` returns now (None when its
        request has not ended), and any that starts later returns at once; so does
        every ``take`` still waiting for a job (None), and any later one waits for none."""

    @abc.abstractmethod
    def stream(self, sid: str, request_id: str) -> AsyncIterator[ChunkEvent | EndEvent]:
        """All chunks so far and then as they come, ending with one EndEvent."""

    @abc.abstractmethod
    async def cancel(self, sid: str, request_id: str, sequence: int | None,
                     code: int = CANCELLED_CODE, message: str = "cancelled") -> CancelOutcome:
        """End a queued or running request now; a running one is also announced to its
        worker (``cancels_for``)."""

    @abc.abstractmethod
    async def clean_queued(self, sid: str, mode: str) -> list[str]:
        """Cancel every queued (undelivered) request of ``mode``; their ids."""

    @abc.abstractmethod
    async def queue_length(self, sid: str) -> int: ...

    @abc.abstractmethod
    async def worker_count(self, sid: str) -> int:
        """Workers of ``sid`` seen within the lease."""

    async def has_worker(self, sid: str) -> bool:
        """Whether any worker of ``sid`` was seen within the lease (asked on every sync
        request: a store can answer it without counting them all)."""
        return await self.worker_count(sid) > 0

    async def ever_had_worker(self, sid: str) -> bool | None:
        """Whether any worker of ``sid`` has connected since this store started (so a
        misspelled id can be told apart from a busy one); None when the store cannot say."""
        return None

    @abc.abstractmethod
    async def stats(self) -> list[SidStats]: ...

    # --- the worker side ------------------------------------------------------
    @abc.abstractmethod
    async def take(self, sid: str, worker: str, wait: float) -> RequestRecord | None:
        """Hand the next queued request to ``worker``, waiting up to ``wait`` seconds.
        Counts as a sign of life of ``worker``."""

    async def take_more(self, sid: str, worker: str, n: int) -> list[RequestRecord]:
        """Up to ``n`` more queued requests for ``worker``, without waiting (a link
        filling one message with all it has credit for)."""
        out: list[RequestRecord] = []
        while len(out) < n:
            rec = await self.take(sid, worker, 0)
            if rec is None:
                break
            out.append(rec)
        return out

    @abc.abstractmethod
    async def give_back(self, sid: str, request_id: str) -> None:
        """A taken request could not be handed over: queue it again at the front."""

    @abc.abstractmethod
    async def touch_worker(self, sid: str, worker: str) -> None:
        """A sign of life: renews the lease on every request ``worker`` holds."""

    async def adopt(self, sid: str, request_id: str, worker: str) -> bool:
        """``worker`` reports a job this store has no delivery of on record: a replica
        handed it over and died before writing that down. When the queue shows it was
        delivered, record it as running on ``worker`` (so its frames are taken, and its
        redelivery when the lease runs out does not start it a second time). True when
        ``worker`` holds it now. A store that always records deliveries keeps this."""
        return False

    @abc.abstractmethod
    async def mark_started(self, sid: str, request_id: str) -> bool:
        """The worker began executing it (from then on it is failed, not redelivered)."""

    def written(self, request_id: str) -> asyncio.Future[None] | None:
        """What this store noted of ``request_id`` and writes behind (a start), as a
        future done once it is kept; None when nothing is pending. A link confirms
        a worker's "executing" only then, so a gateway that dies before the write
        gets it again from the worker, through another gateway."""
        return None

    @abc.abstractmethod
    async def finish(self, sid: str, request_id: str, status_code: int, message: str,
                     result: bytes | None) -> bool:
        """The worker's result. False when unknown or already terminal."""

    async def annotate(self, sid: str, request_id: str, message: str) -> bool:
        """A finished request's status message becomes ``message`` (a webhook's final
        failure); its status, code and result stay. False when unknown or not finished.
        A storage that cannot change a finished record keeps this default."""
        return False

    @abc.abstractmethod
    async def ack(self, sid: str, request_id: str) -> None: ...

    @abc.abstractmethod
    async def add_chunk(self, sid: str, request_id: str, seq: int, data: bytes) -> bool:
        """A stream chunk; False when unknown, already terminal, or over the request's
        chunk cap (each chunk counts its length plus ``CHUNK_OVERHEAD`` bytes)."""

    @abc.abstractmethod
    async def heartbeat(self, sid: str, worker: str, request_ids: list[str]) -> list[str]:
        """Renew leases on ``request_ids``; answer those the worker should stop."""

    @abc.abstractmethod
    async def cancels_for(self, sid: str, request_ids: list[str]) -> list[str]:
        """Of ``request_ids``, those that were ended by the platform while running."""

    @abc.abstractmethod
    async def sweep(self) -> None:
        """Expire TTLs, leases and retention (memory: called on a timer)."""
