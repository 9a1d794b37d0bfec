"""NATS tests reuse the gateway fixtures (real gateways, the ``store`` switch), and
have a client of a nats-server of their own."""

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator

import nats
import pytest
from nats.aio.client import Client

from spirit_gpu.gateway.storage.nats.wire import Wire
from tests.gateway.conftest import gateway_factory, webhooks
from tests.nats_server import TempNats

__all__ = ["gateway_factory", "live", "nats_client", "nats_server", "webhooks", "wire"]


@pytest.fixture
def nats_server() -> Iterator[TempNats]:
    """A nats-server of the test's own (JetStream on, loopback)."""
    server = TempNats()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def nats_client(nats_server: TempNats) -> AsyncIterator[Client]:
    nc = await nats.connect(nats_server.url)
    try:
        yield nc
    finally:
        await nc.close()


@pytest.fixture
async def wire(nats_server: TempNats) -> AsyncIterator[Wire]:
    """The store's lean connection, to the same server."""
    w = Wire([nats_server.url], "test-wire")
    await w.connect()
    try:
        yield w
    finally:
        await w.close()


async def live(wire: Wire, subject: str, seen: Callable[[], int], within: float = 10.0) -> None:
    """Publish probes on ``subject`` through ``wire`` until ``seen()`` (the count a
    subscriber on another connection has received) grows: its SUB is in place at
    the server. (A flush of that connection alone was not always enough under a
    loaded test run: the wire's publish arrived first.)"""
    before = seen()
    deadline = asyncio.get_running_loop().time() + within
    while seen() == before:
        assert asyncio.get_running_loop().time() < deadline, f"{subject}: no subscriber"
        wire.publish(subject, b"probe")
        await asyncio.sleep(0.05)
