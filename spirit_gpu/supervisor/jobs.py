"""A job as the agent hands it over, and the status records reported about it."""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Mapping
from typing import Any

import msgspec

from spirit_gpu.protocol import agent
from spirit_gpu.protocol.agent import DEFAULT_TTL_MS, Envelope, StatusMetric


def now_ms() -> int:
    return int(time.time() * 1000)


class Job(msgspec.Struct):
    """One request taken from the agent. ``body`` is the client's JSON, undecoded."""

    request_id: str
    mode: str = "sync"
    webhook: str = ""
    enqueue_at: int = 0
    create_at: int = 0
    ttl_ms: int = DEFAULT_TTL_MS
    status_subject: str = ""
    body: bytes = b""
    received_at: int = 0
    started_at: int = 0
    # the agent cancelled it after handing it over, before it started here: it must
    # not start (set by a transport that hears of cancels at once, the link)
    cancelled: bool = False


def _first(headers: Mapping[str, Any], name: str) -> str:
    """Header value: the first of comma-joined values; keys matched case-insensitively."""
    low = name.lower()
    for key, value in headers.items():
        if key.lower() == low:
            return agent.first_value(value)
    return ""


def _int(text: str, default: int) -> int:
    try:
        return int(float(text))
    except ValueError:
        return default


class BadEnvelope(ValueError):
    """The agent's answer could not be read as a request."""


_envelope_decoder = msgspec.json.Decoder(Envelope)
_webhook_decoder = msgspec.json.Decoder(dict[str, Any])


def job_from_envelope(raw: bytes) -> Job:
    try:
        env = _envelope_decoder.decode(raw)
        body = base64.b64decode(env.body, validate=False)
    except (msgspec.DecodeError, binascii.Error) as exc:
        raise BadEnvelope(f"unreadable request from agent: {exc}") from exc
    h = env.headers
    request_id = _first(h, agent.REQUEST_ID_HEADER)
    if not request_id:
        raise BadEnvelope("request from agent has no Ease-Request-Id header")
    mode = _first(h, agent.MODE_HEADER) or "sync"
    webhook = _first(h, agent.WEBHOOK_HEADER)
    if mode == "async":
        webhook = webhook_from_body(body)
    return Job(request_id=request_id, mode=mode, webhook=webhook,
               enqueue_at=_int(_first(h, agent.ENQUEUE_AT_HEADER), 0),
               create_at=_int(_first(h, agent.CREATE_AT_HEADER), 0),
               ttl_ms=_int(_first(h, agent.TTL_HEADER), DEFAULT_TTL_MS) or DEFAULT_TTL_MS,
               status_subject=_first(h, agent.STATUS_SUBJECT_HEADER), body=body,
               received_at=now_ms())


def webhook_from_body(body: bytes) -> str:
    """Async requests carry their webhook in the body; a bad body has none."""
    try:
        value = _webhook_decoder.decode(body).get("webhook")
    except msgspec.DecodeError:
        return ""
    return value if isinstance(value, str) else ""


def ttl_expired(job: Job, at_ms: int) -> bool:
    return job.enqueue_at > 0 and at_ms - job.enqueue_at > job.ttl_ms


class StatusReport(msgspec.Struct, frozen=True):
    """A job's status as the job loop reports it; each transport words it its own way
    (the plain agent's ``StatusMetric`` body, the link's ``Metric`` frame)."""

    status: str  # executing | succeed | failed
    message: str
    timestamp: int  # ms
    enqueued_at: int  # ms
    queueing_ms: int
    execution_ms: int


def metric(job: Job, status: str, message: str = "", finished_at: int = 0) -> StatusReport:
    ts = now_ms()
    enq = job.enqueue_at or job.received_at
    started = job.started_at or ts
    queueing = max(0, started - enq)
    execution = max(0, (finished_at or ts) - started) if status != "executing" else 0
    return StatusReport(status=status, message=message, timestamp=ts, enqueued_at=enq,
                        queueing_ms=queueing, execution_ms=execution)


def status_metric(job: Job, report: StatusReport) -> StatusMetric:
    """The plain agent protocol's status body."""
    return StatusMetric(timestamp=report.timestamp, requestID=job.request_id,
                        webhook=job.webhook, status=report.status, operation=job.mode,
                        enqueueTimestamp=report.enqueued_at,
                        queueingDuration=report.queueing_ms,
                        executionDuration=report.execution_ms,
                        totalDuration=report.queueing_ms + report.execution_ms,
                        requestCreateAt=job.create_at, message=report.message)
