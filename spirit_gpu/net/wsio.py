"""Writing to an aiohttp WebSocket without a task when the write need not wait.

aiohttp's ``send_bytes`` writes the frame to the transport before it awaits
anything; it awaits only to drain a transport whose buffer is full. Driving the
coroutine by hand therefore writes at once in the usual case, with no task and
no extra loop turn, and leaves a task only for the rare write that must wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

SendCoro = Coroutine[Any, Any, None]


def start(coro: SendCoro) -> tuple[bool, Any]:
    """Run ``coro`` until it would wait: ``(True, None)`` when it is done, else
    ``(False, what it waits on)``, to be passed to ``finish``. Raises what the send raises."""
    try:
        return False, coro.send(None)
    except StopIteration:
        return True, None


async def finish(coro: SendCoro, waiting: Any) -> None:
    """Drive a send that ``start`` left waiting to its end (raises what it raises)."""
    try:
        while True:
            if waiting is None:  # a bare yield: give the loop one turn
                await asyncio.sleep(0)
            else:
                await asyncio.wait((waiting,))
            try:
                waiting = coro.send(None)
            except StopIteration:
                return
    except asyncio.CancelledError:
        coro.close()
        raise
