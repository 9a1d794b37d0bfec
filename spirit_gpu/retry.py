"""Retry and backoff as data: one policy type and the one loop that reads it.

Every loop that waits longer after each failure (crash restarts, agent pulls,
link reconnects, agent POSTs, webhook delivery, proxy link, check_start polls)
states its delays as a ``RetryPolicy`` and steps through them with ``Backoff``
(or ``attempts()`` for a bounded retry). A policy is frozen: a running loop
never changes another loop's delays.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """``first`` seconds before the first retry, times ``factor`` each time, at
    most ``max_delay``; ``attempts`` tries in all (None: for ever); ``jitter``
    spreads each delay by up to that fraction (0: exact, what tests want)."""

    first: float
    factor: float = 2.0
    max_delay: float = 30.0
    attempts: int | None = None
    jitter: float = 0.0

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1 is the first retry)."""
        base = min(self.max_delay, self.first * self.factor ** max(0, retry - 1))
        if self.jitter:
            base *= 1 + random.uniform(-self.jitter, self.jitter)
        return max(0.0, base)

    async def attempts_of(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
                          ) -> AsyncIterator[int]:
        """Yields 1, 2, ... (at most ``attempts``), sleeping the policy's delay between:
        ``async for attempt in policy.attempts_of(): ... break on success``."""
        attempt = 1
        while True:
            yield attempt
            if self.attempts is not None and attempt >= self.attempts:
                return
            await sleep(self.delay(attempt))
            attempt += 1


class Backoff:
    """A policy's progress in one loop: ``next()`` after a failure, ``reset()`` after a success."""

    __slots__ = ("policy", "failures")

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.failures = 0

    def next(self) -> float:
        """The delay before the next try (the failure count grows)."""
        self.failures += 1
        return self.policy.delay(self.failures)

    @property
    def exhausted(self) -> bool:
        attempts = self.policy.attempts
        return attempts is not None and self.failures >= attempts

    def reset(self) -> None:
        self.failures = 0

    async def sleep(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        await sleep(self.next())
