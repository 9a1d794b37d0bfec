"""NATS tests reuse the gateway fixtures (real gateways, the ``store`` switch), and
have a client of a nats-server of their own."""

from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client

from tests.gateway.conftest import gateway_factory, webhooks
from tests.nats_server import TempNats

__all__ = ["gateway_factory", "nats_client", "webhooks"]


@pytest.fixture
async def nats_client() -> AsyncIterator[Client]:
    """Connected to a nats-server of the test's own (JetStream on, loopback)."""
    server = TempNats()
    try:
        nc = await nats.connect(server.url)
        try:
            yield nc
        finally:
            await nc.close()
    finally:
        server.close()
