"""The original spirit-gpu 0.1.0 worker, unmodified, behind one NATS replica while
its clients talk to another: sync, async with a webhook, a raising handler; each
request's status read through both replicas."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.compat.conftest import Procs
from tests.compat.test_original_handler import SID, connected, sync_async_webhook_and_raise
from tests.gateway.conftest import GatewayFactory, Webhooks

pytestmark = pytest.mark.parametrize("store", ["nats"], indirect=True)


async def test_clients_on_one_replica_are_served_by_an_original_worker_on_another(
        gateway_factory: GatewayFactory, procs: Procs, original_python: Path,
        webhooks: Webhooks) -> None:
    a = await gateway_factory(worker_token="tok")  # the clients' replica
    b = await gateway_factory(worker_token="tok")  # the worker's (through the sidecar)
    worker = procs.original(original_python, "orig_handler.py", await procs.sidecar(b, SID))
    await connected(a)

    await sync_async_webhook_and_raise(a, (a, b), webhooks, worker)
