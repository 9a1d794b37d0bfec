"""The multiplexed worker link: frames between a gateway and a worker.

One WebSocket per worker (``GET <agent>/apis/v1/link``) carries binary
messages, each one MessagePack-encoded ``msgspec.Struct`` of the tagged union
``Frame``. Structs are array-like, so a frame is ``[tag, field, ...]``; new
fields may only be appended, with defaults. Payloads (request and result
bodies, stream chunks) are raw bytes: nothing is base64-encoded on the link.

Gateway -> worker: ``Welcome`` (first frame), ``Dispatch``, ``Cancel``,
``Stored``.
Worker -> gateway: ``Credit``, ``Metric``, ``Result``, ``Ack``, ``Chunk``,
``Heartbeat``.

Flow control: the worker grants credits (``Credit(n)``, n may be negative to
take back unused ones); the gateway sends at most that many ``Dispatch``
frames, each using one credit. Every frame the worker sends renews the lease
on all jobs dispatched to it.

Confirmations (``stored``): a worker that sends ``Spirit-Link-Stored: 1`` on the
upgrade, to a gateway that names ``stored`` in ``Welcome.features``, is told
``Stored(upto)`` once the first ``upto`` frames it sent on this link were handled
(their storage calls returned). It keeps its ``Metric``, ``Result``, ``Ack`` and
``Chunk`` frames until then and sends the unconfirmed ones again, in order,
first thing on its next link: what a dying gateway or connection took is not
lost, and a frame the gateway stored twice changes nothing (chunks count once
per ``seq``, the first end of a request wins).
"""

from __future__ import annotations

import msgspec

VERSION = 1


class Welcome(msgspec.Struct, tag="welcome", array_like=True):
    """The gateway accepted the link. ``lease_ms``: silence after which jobs are lost;
    ``max_message``: the largest message it reads, in bytes (0: not said)."""

    version: int
    lease_ms: int
    features: list[str] = []
    max_message: int = 0


class Dispatch(msgspec.Struct, tag="dispatch", array_like=True):
    """One job. ``body`` is the client's request JSON exactly as it was sent."""

    request_id: str
    mode: str
    webhook: str
    enqueue_at: int
    create_at: int
    ttl_ms: int
    body: bytes


class Cancel(msgspec.Struct, tag="cancel", array_like=True):
    """Stop these requests (the platform already ended them as cancelled)."""

    request_ids: list[str]


class Credit(msgspec.Struct, tag="credit", array_like=True):
    """The worker can take ``n`` more jobs (negative: take back unused credits)."""

    n: int


class Metric(msgspec.Struct, tag="metric", array_like=True):
    """The status metric of a job (``status``: executing | succeed | failed)."""

    request_id: str
    status: str
    message: str = ""
    queueing_ms: int = 0
    execution_ms: int = 0


class Result(msgspec.Struct, tag="result", array_like=True):
    """A job's result: the handler's bytes, not base64-encoded."""

    request_id: str
    status_code: int
    message: str
    data: bytes


class Ack(msgspec.Struct, tag="ack", array_like=True):
    """The worker is done with a job (result and metrics reported)."""

    request_id: str


class Chunk(msgspec.Struct, tag="chunk", array_like=True):
    """One JSON-encoded item a generator handler yielded; ``seq`` counts from 0."""

    request_id: str
    seq: int
    data: bytes


class Heartbeat(msgspec.Struct, tag="heartbeat", array_like=True):
    """The requests the worker is running now."""

    request_ids: list[str]


class Stored(msgspec.Struct, tag="stored", array_like=True):
    """The first ``upto`` frames the worker sent on this link were handled (counted
    from 1, every frame the worker sent, batched or not). Sent only to a worker that
    asked (``Spirit-Link-Stored: 1``), at most once per short interval."""

    upto: int


Frame = (Welcome | Dispatch | Cancel | Credit | Metric | Result | Ack | Chunk | Heartbeat
         | Stored)
# the worker's frames about one request, which carry its state: the gateway handles a
# request's in order, and the worker keeps them until the gateway confirms them
REQUEST_FRAMES = (Metric, Result, Ack, Chunk)


class Batch(msgspec.Struct, tag="batch", array_like=True):
    """Several frames in one WebSocket message: what one event-loop turn produced.

    Sent only to a peer that announced ``batch`` (the gateway in ``Welcome``,
    the worker with the ``Spirit-Link-Batch: 1`` upgrade header); one message
    instead of one per frame is what keeps the link's cost per job low.
    """

    frames: list[Frame]


Message = Frame | Batch
BATCH_HEADER = "Spirit-Link-Batch"
STORED_HEADER = "Spirit-Link-Stored"  # the worker reads Stored frames
STORED = "stored"  # the Welcome feature: this gateway confirms, to a worker that asks

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)  # type: ignore[arg-type]


def encode(frame: Frame | Batch) -> bytes:
    return _encoder.encode(frame)


def encode_many(frames: list[Frame]) -> bytes:
    """One frame as itself, several as a Batch."""
    return _encoder.encode(frames[0] if len(frames) == 1 else Batch(frames))


def decode(data: bytes) -> Frame:
    """One frame. Raises ``msgspec.DecodeError`` (or ValidationError) when malformed."""
    message = _decoder.decode(data)
    if isinstance(message, Batch):
        raise msgspec.ValidationError("expected one frame, got a batch")
    return message


def decode_all(data: bytes) -> list[Frame]:
    """The frames of one message, batched or not."""
    message = _decoder.decode(data)
    return message.frames if isinstance(message, Batch) else [message]
