"""Stream, subject and consumer names of the NATS store, and the records it keeps.

* ``SPIRIT_JOBS`` (work queue): one message per queued request on
  ``spirit.jobs.<sid>.<id>``, holding the whole record as submitted (a request
  has no record in ``SPIRIT_REQ`` until it is delivered a while or ends: its
  message stands for it until then); one durable pull consumer per serverless
  id; the message's ack subject is the lease (ack-wait redelivery, ``+WPI``
  renews).
* ``SPIRIT_REQ`` (one message per subject, per-message TTL): the request's
  record on ``spirit.req.<sid>.<id>``, updated compare-and-set on the subject's
  last sequence; a terminal record lives for the retention, then the server
  drops it.
* ``SPIRIT_CHUNKS``: stream chunks on ``spirit.chunks.<sid>.<id>``.
* ``SPIRIT_WORKERS`` (last per subject, max age a few leases): worker presence.
* Object Store bucket ``spirit_blobs``: bodies, results and chunks too large
  for one NATS message.
* Core subjects: ``spirit.done.<replica>`` (a sync request's waiter is woken),
  ``spirit.cancel`` (a running request was cancelled: the replica holding its
  link tells the worker), ``spirit.proxy.reg`` (the shared proxy registry),
  ``spirit.proxy.answer.<replica>`` (a queued proxy answer relayed to the
  replica holding its client).
"""

from __future__ import annotations

import msgspec

from spirit_gpu.gateway.storage.base import RequestRecord

JOBS = "SPIRIT_JOBS"
REQ = "SPIRIT_REQ"
CHUNKS = "SPIRIT_CHUNKS"
WORKERS = "SPIRIT_WORKERS"
BLOBS = "spirit_blobs"

BLOB_HEADER = "Spirit-Blob"
CANCEL_SUBJECT = "spirit.cancel"
PROXY_SUBJECT = "spirit.proxy.reg"


def job(sid: str, request_id: str) -> str:
    """A queued request's own subject: its message is found by it (a status read of a
    request that has no record yet)."""
    return f"spirit.jobs.{sid}.{request_id}"


def jobs(sid: str) -> str:
    """Every queued request of ``sid`` (its consumer's filter)."""
    return f"spirit.jobs.{sid}.*"


def record(sid: str, request_id: str) -> str:
    return f"spirit.req.{sid}.{request_id}"


def chunks(sid: str, request_id: str) -> str:
    return f"spirit.chunks.{sid}.{request_id}"


def worker(sid: str, worker_id: str) -> str:
    # worker ids hold ':' and '.', which subjects do not take as one token
    return f"spirit.workers.{sid}.{worker_id.encode().hex()}"


def done(replica: str) -> str:
    return f"spirit.done.{replica}"


def consumer(sid: str) -> str:
    """Consumer names take no '.': such sids are hex-encoded (a distinct prefix)."""
    return f"sid-{sid}" if "." not in sid else f"sidx-{sid.encode().hex()}"


class Doc(RequestRecord):
    """A request's record as kept in ``SPIRIT_REQ`` (and as queued in ``SPIRIT_JOBS``,
    where ``body`` is set)."""

    ack: str = ""  # the ack subject of the delivery the worker holds
    delivered_at: int = 0  # ms, when it was last handed to a worker
    waiter: str = ""  # the replica whose client waits for it (sync)
    result_blob: str = ""  # the result is in the object store under this name
    body_blob: str = ""


encode = msgspec.msgpack.Encoder().encode
decode = msgspec.msgpack.Decoder(Doc).decode
