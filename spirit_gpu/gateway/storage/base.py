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


class RequestRecord(msgspec.Struct):
    """One request's whole life. Times are epoch milliseconds."""

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


class ChunkEvent(msgspec.Struct):
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

    async def start(self) -> None:
        """Open connections, start background work."""
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

    @abc.abstractmethod
    async def wait_done(self, sid: str, request_id: str, wait: float) -> RequestRecord | None:
        """The request once terminal; None when it is not terminal within ``wait`` s."""

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

    @abc.abstractmethod
    async def stats(self) -> list[SidStats]: ...

    # --- the worker side ------------------------------------------------------
    @abc.abstractmethod
    async def take(self, sid: str, worker: str, wait: float) -> RequestRecord | None:
        """Hand the next queued request to ``worker``, waiting up to ``wait`` seconds.
        Counts as a sign of life of ``worker``."""

    @abc.abstractmethod
    async def give_back(self, sid: str, request_id: str) -> None:
        """A taken request could not be handed over: queue it again at the front."""

    @abc.abstractmethod
    async def touch_worker(self, sid: str, worker: str) -> None:
        """A sign of life: renews the lease on every request ``worker`` holds."""

    @abc.abstractmethod
    async def mark_started(self, sid: str, request_id: str) -> bool:
        """The worker began executing it (from then on it is failed, not redelivered)."""

    @abc.abstractmethod
    async def finish(self, sid: str, request_id: str, status_code: int, message: str,
                     result: bytes | None) -> bool:
        """The worker's result. False when unknown or already terminal."""

    @abc.abstractmethod
    async def ack(self, sid: str, request_id: str) -> None: ...

    @abc.abstractmethod
    async def add_chunk(self, sid: str, request_id: str, seq: int, data: bytes) -> bool:
        """A stream chunk; False when unknown or already terminal."""

    @abc.abstractmethod
    async def heartbeat(self, sid: str, worker: str, request_ids: list[str]) -> list[str]:
        """Renew leases on ``request_ids``; answer those the worker should stop."""

    @abc.abstractmethod
    async def cancels_for(self, sid: str, request_ids: list[str]) -> list[str]:
        """Of ``request_ids``, those that were ended by the platform while running."""

    @abc.abstractmethod
    async def sweep(self) -> None:
        """Expire TTLs, leases and retention (memory: called on a timer)."""
