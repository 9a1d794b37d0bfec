"""How the supervisor talks to the platform: the interface both transports share.

``PlainTransport`` (plain.py) speaks the reference HTTP protocol; the
multiplexed ``LinkTransport`` (link.py) carries the same calls as
msgspec frames over one WebSocket. The job loop only sees this interface, and
reads what a transport offers from its ``capabilities``, never by probing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import msgspec

from spirit_gpu.protocol.agent import HeartbeatReply
from spirit_gpu.supervisor.jobs import Job, StatusReport


class PullResult(msgspec.Struct):
    jobs: list[Job]
    healthy: bool = True


class Capabilities(msgspec.Struct, frozen=True):
    """What a transport offers the job loop."""

    batched_pulls: bool = False  # one pull() may hand over many jobs: one puller is enough
    instant_metrics: bool = False  # metric() only queues and returns: no task needed


class AgentUnavailable(Exception):
    """The agent could not be reached or answered with an error."""


class Transport(Protocol):
    capabilities: Capabilities
    features: set[str]  # extensions the agent announced (longpoll, stream, link, ...)

    async def pull(self, limit: int) -> PullResult:
        """Up to ``limit`` jobs; may wait (long-poll); [] when there is nothing.
        Raises ``AgentUnavailable`` when the agent cannot be reached."""

    async def metric(self, job: Job, report: StatusReport) -> None: ...

    async def result(self, job: Job, status_code: int, message: str, data: bytes) -> None: ...

    async def ack(self, job: Job) -> None: ...

    async def chunk(self, job: Job, seq: int, data: bytes) -> None:
        """A generator's item as it is yielded (no-op where the agent has no streams)."""

    async def heartbeat(self, request_ids: list[str]) -> HeartbeatReply:
        """Raises ``AgentUnavailable`` when it could not be delivered."""

    def on_cancel(self, cancel: Callable[[str], bool]) -> None:
        """Call ``cancel(request_id)`` the moment the agent cancels a request, where the
        agent can say so between heartbeats (the link); ``cancel`` answers whether it
        stopped a running job. A job handed over and not started yet is marked
        (``Job.cancelled``) instead; other cancels come with the next heartbeat's reply."""

    async def close(self) -> None: ...
