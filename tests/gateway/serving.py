"""A gateway run the way the CLI runs it (``server.serve``: connection guard, raised
fd limit, log redaction), for tests of what only that path adds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from spirit_gpu.gateway.config import GatewayConfig
from spirit_gpu.gateway.server import serve

Served = Callable[..., Awaitable[int]]  # overrides -> port


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    running: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    async def start(**overrides: Any) -> int:
        from tests.gateway.conftest import KEY  # conftest imports this module
        values: dict[str, Any] = {"api_keys": [KEY], "port": 0, "sweep_interval": 0.05}
        values.update(overrides)
        stop = asyncio.Event()
        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve(GatewayConfig(**values), stop, ready.set_result))
        running.append((stop, task))
        done, _ = await asyncio.wait((ready, task), timeout=10,
                                     return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()  # raises what stopped it
        return ready.result()

    yield start
    for stop, _ in running:
        stop.set()
    await asyncio.gather(*(task for _, task in running), return_exceptions=True)


async def closed_by_peer(reader: asyncio.StreamReader, within: float = 10.0) -> bytes:
    """Everything the gateway sends until it closes the connection (fails after ``within``)."""
    data = b""
    async with asyncio.timeout(within):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk
