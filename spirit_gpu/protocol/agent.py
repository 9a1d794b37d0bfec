"""The plain agent protocol (DESIGN.md sections 5 and 5a): paths, headers, bodies.

What the hosted platform's agent and our gateway's agent API both speak, and
what the worker sends them. Field names are the wire names; every body here
has a golden test (tests/protocol/test_agent_golden.py). Our extensions
(long-poll, stream chunks, cancel in heartbeats, the link, proxy registration)
are announced by the agent in ``Spirit-Agent-Features`` and stay optional.
"""

from __future__ import annotations

from typing import Any

import msgspec

API_PREFIX = "/apis/v1"
REQUEST = "request"
METRIC = "request-metric"
RESULT = "request-result"
ACK = "request-ack"
CHUNK = "request-chunk"
PROXY_ANSWER = "request-proxy"
HEARTBEAT = "heartbeat"
LINK = "link"

DEFAULT_AGENT_URL = "http://localhost:8087"
DEFAULT_TTL_MS = 600_000

# Headers of a request envelope (values may be comma-joined; the first counts).
MODE_HEADER = "Ease-Mode"
WEBHOOK_HEADER = "Ease-Webhook"
REQUEST_ID_HEADER = "Ease-Request-Id"
ENQUEUE_AT_HEADER = "Ease-Enqueue-At"
CREATE_AT_HEADER = "Ease-Create-At"
STATUS_SUBJECT_HEADER = "Ease-Status-Subject"
TTL_HEADER = "Ease-Time-To-Live"
# On agent answers: "false" means the agent is unhealthy.
HEALTH_HEADER = "X-Agent-Health"

# Our extensions.
FEATURES_HEADER = "Spirit-Agent-Features"
WORKER_ID_HEADER = "Spirit-Worker-Id"
# where the worker reaches the agent API (an agent sidecar in between: its own root), so
# that the webhook relay URL handed to the worker goes through the same way
AGENT_BASE_HEADER = "Spirit-Agent-Base"
CHUNK_SEQ_HEADER = "Spirit-Chunk-Seq"


def join_url(base: str, path: str) -> str:
    """``base`` (which may carry a path prefix like ``/agent/<sid>``) plus ``path``."""
    return base.rstrip("/") + "/" + path.lstrip("/")


def endpoint(agent_url: str, path: str) -> str:
    """``<agent_url>/apis/v1/<path>``, keeping any path prefix the agent URL has.

    (The original worker uses ``urljoin`` with an absolute path, which drops a
    prefix such as ``/agent/<sid>``: see DESIGN.md 5a and ``spirit-gpu agent``.)
    """
    return join_url(agent_url, f"{API_PREFIX}/{path.lstrip('/')}")


def parse_features(value: str | None) -> set[str]:
    """The features a ``Spirit-Agent-Features`` value (comma-separated) names."""
    if not value:
        return set()
    return {part.strip().lower() for part in value.split(",") if part.strip()}


def has_feature(value: str | None, feature: str) -> bool:
    """Whether a ``Spirit-Agent-Features`` value names ``feature``."""
    return feature in parse_features(value)


def first_value(value: Any) -> str:
    """A header value as the reference reads it: the first of comma-joined values."""
    if value is None:
        return ""
    if isinstance(value, list):
        value = value[0] if value else ""
    return str(value).split(",")[0].strip()


class Envelope(msgspec.Struct, kw_only=True):
    """``GET /apis/v1/request``'s answer: the ``Ease-*`` headers and the base64 body."""

    headers: dict[str, Any] = {}
    body: str


class StatusMetric(msgspec.Struct, kw_only=True):
    """The body of ``request-metric/<id>`` (all times in ms).

    Every field has a default so that an agent reads a partial metric; a
    worker always sends them all.
    """

    timestamp: int = 0
    requestID: str = ""
    webhook: str = ""
    status: str = ""  # executing | succeed | failed
    operation: str = ""  # sync | async
    enqueueTimestamp: int = 0
    queueingDuration: int = 0
    executionDuration: int = 0
    totalDuration: int = 0
    requestCreateAt: int = 0
    message: str = ""


class ResultBody(msgspec.Struct):
    """The body of ``request-result/<id>``; ``data`` is the base64 of the result bytes."""

    statusCode: int
    message: str = ""
    data: str = ""


class Heartbeat(msgspec.Struct):
    """The body of ``POST /apis/v1/heartbeat``: the requests running now."""

    requestIDs: list[str] | None = None


class HeartbeatReply(msgspec.Struct):
    """Our agent's answer to a heartbeat: ``cancel`` names requests to stop."""

    cancel: list[str] = []


class ProxyJob(msgspec.Struct, kw_only=True):
    """The body of a queue-delivered proxy job (DESIGN.md 5a).

    ``header`` maps a name to its values; ``body`` is base64. The answer goes to
    ``POST request-proxy/<id>?statusCode=<upstream status>`` as a stream.
    """

    method: str = "GET"
    uri: str = "/"
    header: dict[str, list[str]] = {}
    body: str = ""


def result_content_type(data: bytes) -> str:
    """How a handler's result is served to a client: JSON when it parses as JSON (every
    result but a handler's returned bytes), else raw bytes."""
    try:
        msgspec.json.decode(data, type=msgspec.Raw)
    except msgspec.DecodeError:
        return "application/octet-stream"
    return "application/json"
