"""What the worker loop, test server and proxy need from a pool of handlers.

``Pool`` (handler processes) is the real one; ``InProcessPool`` the debugging one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from spirit_gpu.config import WorkerConfig
from spirit_gpu.handlers import EmitChunk, Outcome
from spirit_gpu.supervisor.jobs import Job

# the supervisor's exit status when its pool gave up (max_crashes failures in a
# row): a platform should replace the machine rather than restart the process alone
EXIT_UNHEALTHY = 4


class JobPool(Protocol):
    cfg: WorkerConfig
    kind: str | None
    options: dict[str, object]
    changed: asyncio.Event
    listeners: list[Callable[[], None]]
    unhealthy: str  # "" while healthy, else why the worker should be replaced

    @property
    def slots(self) -> int: ...

    def running_request_ids(self) -> list[str]: ...

    async def start(self) -> None: ...

    async def wait_ready(self) -> None: ...

    async def run(self, job: Job, on_chunk: EmitChunk | None = None) -> Outcome: ...

    def cancel(self, request_id: str, status_code: int = 499,
               reason: str = "request cancelled") -> bool: ...

    async def check_start(self) -> tuple[bool, str]: ...

    def hurry(self) -> None:
        """No more grace (a second SIGINT): end running jobs now."""

    async def drain(self, grace: float) -> None: ...

    async def close(self) -> None: ...
