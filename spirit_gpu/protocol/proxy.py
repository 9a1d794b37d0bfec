"""Proxy-worker registration: the optional agent-API extension, on the wire.

A proxy-mode worker tells the agent where its listener is and whether it is
ready. The agent advertises the extension with ``proxy`` in the
``Spirit-Agent-Features`` response header; an agent without it (the hosted
platform's) gets the plain heartbeat instead.

``POST {agent}/apis/v1/proxy/register``  body ``ProxyRegistration`` -> ``RegisterReply``
    Registers or refreshes the worker (an upsert: the worker repeats it every
    heartbeat interval, which keeps it alive). A worker not heard from for
    ``leaseSeconds`` is dropped from routing.
``POST {agent}/apis/v1/proxy/deregister`` body ``ProxyDeregistration`` -> 200 ``{}``
    The worker is stopping: route nothing more to it.
``GET {agent}/apis/v1/proxy/workers`` -> ``{"workers": [ProxyWorkerInfo]}``
    What the agent knows (for people and tests).

Requests carry ``Authorization: Bearer <worker token>`` when one is set. The
gateway reaches the listener with the client's request plus two headers of
ours: ``Spirit-Request-Id`` (for logs on both sides) and, when a worker token
is set, ``Spirit-Worker-Token`` (so a listener bound to a public address only
serves its gateway). Neither reaches the LLM server.
"""

from __future__ import annotations

import msgspec

FEATURE = "proxy"
REGISTER_PATH = "/apis/v1/proxy/register"
DEREGISTER_PATH = "/apis/v1/proxy/deregister"
WORKERS_PATH = "/apis/v1/proxy/workers"

REQUEST_ID_HEADER = "Spirit-Request-Id"
WORKER_TOKEN_HEADER = "Spirit-Worker-Token"
CLIENT_AUTH_HEADER = "Auth"


class ProxyRegistration(msgspec.Struct):
    workerID: str
    url: str
    ready: bool
    inflight: int = 0
    heartbeatInterval: float = 5.0


class RegisterReply(msgspec.Struct):
    workerID: str
    leaseSeconds: float
    link: str = ""  # path of the proxy link under the agent URL; "" when not offered


class ProxyDeregistration(msgspec.Struct):
    workerID: str


class ProxyWorkerInfo(msgspec.Struct):
    workerID: str
    url: str
    ready: bool
    inflight: int
    reportedInflight: int
    expiresIn: float


class ProxyWorkers(msgspec.Struct):
    workers: list[ProxyWorkerInfo]


# ---- the proxy link: proxied exchanges multiplexed over one WebSocket ----------------
#
# When the register reply names ``link`` (a path under the agent URL), the worker
# dials ``GET {agent}{link}?workerID=<id>`` (a WebSocket, same bearer token) and the
# gateway sends proxied requests over it instead of opening HTTP connections to the
# listener. Each binary message is a msgpack array of frames (``LinkFrames``); frames
# produced in the same event-loop turn travel together. A request body travels in
# ``LinkOpen.body``; when ``more`` is set, ``LinkData`` frames follow, then ``LinkEnd``.
# The answer is ``LinkHead``, ``LinkData``..., then ``LinkEnd`` (complete) or
# ``LinkFail`` (cut; before ``LinkHead`` it means the LLM server could not be reached).
# ``LinkCancel`` aborts an exchange (the client went away, or a limit passed).

class LinkOpen(msgspec.Struct, tag="open", array_like=True):
    id: int
    method: str
    path: str  # raw path and query, as the client wrote them
    headers: list[tuple[str, str]]
    body: bytes
    more: bool
    request_id: str


class LinkCancel(msgspec.Struct, tag="cancel", array_like=True):
    id: int


class LinkHead(msgspec.Struct, tag="head", array_like=True):
    id: int
    status: int
    reason: str
    headers: list[tuple[str, str]]


class LinkData(msgspec.Struct, tag="data", array_like=True):
    id: int
    data: bytes


class LinkEnd(msgspec.Struct, tag="end", array_like=True):
    id: int


class LinkFail(msgspec.Struct, tag="fail", array_like=True):
    id: int
    message: str


LinkFrame = LinkOpen | LinkCancel | LinkHead | LinkData | LinkEnd | LinkFail
LINK_PATH = "/apis/v1/proxy/link"


def payload_size(frame: LinkFrame) -> int:
    """Body bytes ``frame`` carries (what a writer counts toward its buffer limit):
    a request body sent whole in ``LinkOpen`` counts as much as one in ``LinkData``."""
    if isinstance(frame, LinkData):
        return len(frame.data)
    if isinstance(frame, LinkOpen):
        return len(frame.body)
    return 0

encode_frames = msgspec.msgpack.Encoder().encode
"""One link message: a list of frames."""
decode_frames = msgspec.msgpack.Decoder(list[LinkFrame]).decode
"""The frames of one link message; raises ``msgspec.DecodeError`` when malformed."""
