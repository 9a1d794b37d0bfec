"""`Env`: the handler's second argument, its window on the runtime."""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_AGENT_URL = "http://localhost:8087"


@dataclass
class Env:
    """What a handler may know about and ask of the runtime.

    ``request_id`` is the current request's id; ``mode`` is ``sync`` or
    ``async``; ``agent_url`` the agent the worker talks to (the worker config's:
    flag, env var or start() key); ``recycle()`` asks for this handler process to be replaced once
    the current job is done (for example to hand GPU memory back).
    """

    request_id: str = ""
    mode: str = "sync"
    webhook: str = ""
    test_mode: bool = False
    recycle_requested: bool = False
    agent_url: str = DEFAULT_AGENT_URL  # the worker config's (--agent-url, EASE_AGENT_URL)

    @property
    def pid(self) -> int:
        return os.getpid()

    def recycle(self) -> None:
        """Replace this handler process after the current job (frees GPU memory)."""
        self.recycle_requested = True
