"""RetryPolicy and Backoff: the delays every backoff loop reads."""

from __future__ import annotations

import pytest

from spirit_gpu.retry import Backoff, RetryPolicy


def test_delays_grow_by_the_factor_up_to_the_cap() -> None:
    policy = RetryPolicy(first=0.5, factor=2.0, max_delay=3.0)
    assert [policy.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_jitter_stays_within_its_fraction() -> None:
    policy = RetryPolicy(first=1.0, factor=1.0, jitter=0.25)
    assert all(0.75 <= policy.delay(1) <= 1.25 for _ in range(200))


def test_backoff_steps_and_resets() -> None:
    backoff = Backoff(RetryPolicy(first=0.1, factor=2.0, max_delay=1.0, attempts=3))
    assert [backoff.next() for _ in range(3)] == pytest.approx([0.1, 0.2, 0.4])
    assert backoff.exhausted
    backoff.reset()
    assert backoff.next() == pytest.approx(0.1) and not backoff.exhausted


async def test_attempts_sleep_between_tries_and_stop_at_the_limit() -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
    policy = RetryPolicy(first=0.1, factor=3.0, max_delay=10.0, attempts=4)
    tries = [n async for n in policy.attempts_of(sleep)]
    assert tries == [1, 2, 3, 4]
    assert slept == pytest.approx([0.1, 0.3, 0.9])  # none before the first, none after the last


async def test_forever_until_the_caller_breaks() -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
    async for n in RetryPolicy(first=1.0, max_delay=4.0).attempts_of(sleep):
        if n == 6:
            break
    assert slept == [1.0, 2.0, 4.0, 4.0, 4.0]
