"""An unreachable peer (the agent for a worker, the gateway for a sidecar), logged once
when it goes and once when it is back, however many calls fail in between."""

from __future__ import annotations

import time

from spirit_gpu.log import logger


class Outage:
    """Logs an outage of ``what`` once when it starts and once when it ends (``down``,
    ``up``: the words for each, "unreachable" and "reachable again" by default)."""

    def __init__(self, what: str, down: str = "unreachable",
                 up: str = "reachable again") -> None:
        self.what = what
        self.words = (down, up)
        self.since: float | None = None

    @property
    def ongoing(self) -> bool:
        return self.since is not None

    def down(self, error: object) -> None:
        if self.since is None:
            self.since = time.monotonic()
            logger.error(f"{self.what} {self.words[0]} ({error}); retrying with backoff")

    def up(self) -> None:
        if self.since is not None:
            logger.info(f"{self.what} {self.words[1]} after "
                        f"{time.monotonic() - self.since:.1f} s")
            self.since = None
