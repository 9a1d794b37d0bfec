"""How the supervisor talks to the platform: the interface both transports share.

``PlainTransport`` (plain.py) speaks the reference HTTP protocol; the
multiplexed ``LinkTransport`` (link.py) carries the same calls as
msgspec frames over one WebSocket. The worker loop only sees this interface.
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from spirit_gpu.protocol.agent import HeartbeatReply, StatusMetric
from spirit_gpu.supervisor.jobs import Job


class PullResult(msgspec.Struct):
    jobs: list[Job]
    healthy: bool = True


class Transport(Protocol):
    features: set[str]

    async def pull(self, limit: int) -> PullResult:
        """Up to ``limit`` jobs; may wait (long-poll); [] when there is nothing."""

    async def metric(self, job: Job, status: StatusMetric) -> None: ...

    async def result(self, job: Job, status_code: int, message: str, data: bytes) -> None: ...

    async def ack(self, job: Job) -> None: ...

    async def chunk(self, job: Job, seq: int, data: bytes) -> None:
        """A generator's item as it is yielded (no-op where the agent has no streams)."""

    async def heartbeat(self, request_ids: list[str]) -> HeartbeatReply: ...

    async def close(self) -> None: ...
