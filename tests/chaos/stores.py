"""The storage backends the chaos suite runs the gateway with.

Each store says how to run a gateway on it and whether it outlives a gateway:
with a store that does not (``memory``), a killed gateway's requests are gone
by design, so the suite counts only requests that the gateway alive at the end
accepted; with a durable one every accepted request counts.

Adding a store: subclass ``Store``, start what it needs in
``running`` (a nats-server on 127.0.0.1, for instance) and yield the gateway
flags that select it; add it to ``STORES``. The suite is parametrized over
``STORES`` (tests/chaos/conftest.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path


class Store:
    name = "memory"
    durable = False  # requests survive a gateway restart

    @contextlib.asynccontextmanager
    async def running(self, workdir: Path) -> AsyncIterator[list[str]]:
        """Whatever the store needs, for the whole run; yields the gateway's extra flags."""
        yield []


class NatsStore(Store):
    """NATS JetStream (a nats-server of the run's own on 127.0.0.1): it outlives the
    gateway, so every request any gateway of the run accepted must end."""

    name = "nats"
    durable = True

    @contextlib.asynccontextmanager
    async def running(self, workdir: Path) -> AsyncIterator[list[str]]:
        from tests.nats_server import TempNats

        server = TempNats()
        try:
            yield ["--store", server.url]
        finally:
            server.close()


STORES: dict[str, Store] = {"memory": Store(), "nats": NatsStore()}
