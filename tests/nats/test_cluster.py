"""A 3-node NATS cluster with R3 streams: the stream leader SIGKILLed while jobs flow
loses no request."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import nats as nats_py
import pytest

from spirit_gpu.gateway.storage.nats import names
from tests.conftest import free_port
from tests.gateway.conftest import Webhooks
from tests.nats.replicas import (
    DOUBLE,
    SCALE,
    Replica,
    Tally,
    settle,
    submit_async,
    worker_env,
)
from tests.nats.test_failures import replicas, session, wait_worker
from tests.nats_server import NatsServer

__all__ = ["replicas", "session"]


@pytest.fixture
def cluster() -> Iterator[list[NatsServer]]:
    root = Path(tempfile.mkdtemp(prefix="spirit-nats-cluster-"))
    cports = [free_port() for _ in range(3)]
    nodes = [NatsServer(root, name=f"n{i}", cluster_port=cports[i],
                        routes=[p for j, p in enumerate(cports) if j != i]) for i in range(3)]
    for n in nodes:
        n.start(wait=False)
    for n in nodes:
        n.wait_ready()
    yield nodes
    for n in nodes:
        n.kill()
    shutil.rmtree(root, ignore_errors=True)


async def stream_leader(urls: str) -> str:
    nc = await nats_py.connect(urls.split(","))
    try:
        js = nc.jetstream()
        for _ in range(100):
            try:
                info = await js.stream_info(names.JOBS)
                if info.cluster is not None and info.cluster.leader:
                    return info.cluster.leader
            except Exception:  # noqa: BLE001 - not elected yet
                pass
            await asyncio.sleep(0.1)
        raise AssertionError("no stream leader")
    finally:
        await nc.close()


async def test_stream_leader_killed_while_jobs_flow(
        cluster: list[NatsServer], replicas: Callable[..., Replica], worker_factory: Any,
        session: aiohttp.ClientSession, webhooks: Webhooks) -> None:
    urls = ",".join(n.url for n in cluster)
    a = await make_ready(replicas, urls, session)
    b = await make_ready(replicas, urls, session)
    worker = worker_factory(DOUBLE, worker_env(b, "c", "link"))
    await wait_worker(session, b, "c", worker)
    leader = await stream_leader(urls)
    tally = Tally()
    for i in range(60 * SCALE):
        # a client retries what was refused (500 while the stream elects a leader)
        for _ in range(20):
            before = len(tally.accepted)
            await submit_async(session, (a, b)[i % 2].url, "c", {"x": i}, webhooks.url, tally)
            if len(tally.accepted) > before:
                break
        if i == 20 * SCALE:
            next(n for n in cluster if n.name == leader).kill()
    await settle(session, a.url, "c", tally, within=40 * SCALE)
    await asyncio.sleep(0.5)
    tally.hooks = Counter(q.get("requestID", "") for q, _ in webhooks.received)
    print(f"cluster, leader {leader} SIGKILLed:", tally.report())
    assert len(tally.accepted) == 60 * SCALE, tally.report()
    assert not tally.lost, tally.report()
    assert not tally.duplicated, tally.report()


async def make_ready(replicas: Callable[..., Replica], urls: str,
                     session: aiohttp.ClientSession) -> Replica:
    # a lease longer than the election: deliveries the new leader replays are known as such
    return await replicas(urls, lease=5.0).ready(session, within=30)


@pytest.fixture(autouse=True)
def _replicas_r3(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPIRIT_STORE_REPLICAS", "3")  # the replicas inherit it



async def test_a_gateway_given_one_node_carries_on_through_the_others_when_it_dies(
        cluster: list[NatsServer], replicas: Callable[..., Replica], worker_factory: Any,
        session: aiohttp.ClientSession, webhooks: Webhooks) -> None:
    """--store names only n0: both of the gateway's connections go on through the nodes
    the cluster told it of."""
    gateway = await make_ready(replicas, cluster[0].url, session)
    worker = worker_factory(DOUBLE, worker_env(gateway, "c", "link"))
    await wait_worker(session, gateway, "c", worker)
    tally = Tally()
    for i in range(10):
        await submit_async(session, gateway.url, "c", {"x": i}, webhooks.url, tally)
    await settle(session, gateway.url, "c", tally, within=20)
    cluster[0].kill()
    for i in range(10, 20):
        for _ in range(40):  # refused (500) until its connections found another node
            before = len(tally.accepted)
            await submit_async(session, gateway.url, "c", {"x": i}, webhooks.url, tally)
            if len(tally.accepted) > before:
                break
            await asyncio.sleep(0.5)
    await settle(session, gateway.url, "c", tally, within=40)
    assert len(tally.accepted) == 20, tally.report()
    assert not tally.lost, tally.report()
    assert not tally.duplicated, tally.report()
