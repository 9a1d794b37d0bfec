"""Failures with NATS-backed replicas as real processes: a replica SIGKILLed under
load, every replica restarted, a worker SIGKILLed mid-job, NATS restarted under
load. Each prints its count (sent, accepted, terminal, lost, duplicated)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Worker, until
from tests.gateway.conftest import AUTH, Webhooks
from tests.nats.replicas import (
    DOUBLE,
    SCALE,
    Replica,
    Tally,
    settle,
    submit_async,
    worker_env,
)
from tests.nats_server import TempNats

# a rolling restart keeps its jobs when a worker is back on a replica within the lease
# (here each replica restarts on its port in 1-2 s; the default lease is 20 s)
ROLLING_LEASE = 5.0


@pytest.fixture
def nats() -> Any:
    server = TempNats()
    yield server
    server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def replicas(tmp_path: Path) -> Any:
    made: list[Replica] = []

    def make(store: str, **kw: Any) -> Replica:
        r = Replica(store, tmp_path / f"replica{len(made)}.log", **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.kill()


def hook_counts(webhooks: Webhooks) -> Counter[str]:
    return Counter(q.get("requestID", "") for q, _ in webhooks.received)


async def wait_worker(session: aiohttp.ClientSession, replica: Replica, sid: str,
                      worker: Worker, job: object = None) -> None:
    """Until a sync request through ``replica`` is answered (``job``: its input)."""
    async def up() -> bool:
        assert worker.proc.poll() is None, worker.output
        async with session.post(f"{replica.url}/v1/{sid}/sync", headers=AUTH,
                                json={"input": {"x": 1} if job is None else job}) as resp:
            return resp.status == 200
    await until(up, 30, "worker answering")


async def test_replica_sigkilled_under_load(nats: TempNats, replicas: Callable[..., Replica],
                                            worker_factory: Any, session: aiohttp.ClientSession,
                                            webhooks: Webhooks) -> None:
    a = await replicas(nats.url).ready(session)
    b = await replicas(nats.url).ready(session)
    wa = worker_factory(DOUBLE, worker_env(a, "k", "plain"))
    wb = worker_factory(DOUBLE, worker_env(b, "k", "link"))
    await wait_worker(session, a, "k", wa)
    await wait_worker(session, b, "k", wb)
    tally = Tally()
    for i in range(120 * SCALE):
        target = a if i % 2 == 0 and i < 60 * SCALE else b
        await submit_async(session, target.url, "k", {"x": i, "sleep": 0.02}, webhooks.url, tally)
        if i == 60 * SCALE:
            a.kill()  # mid-load: its queued jobs stay in NATS; its worker's jobs move on
    await settle(session, b.url, "k", tally, within=30 * SCALE)
    await asyncio.sleep(0.5)  # late webhooks would show duplicates
    tally.hooks = hook_counts(webhooks)
    print("replica SIGKILL:", tally.report())
    assert not tally.lost, tally.report()
    assert not tally.duplicated, tally.report()
    assert tally.refused == 0


async def test_rolling_restart_with_sigterm_under_load(
        nats: TempNats, replicas: Callable[..., Replica], worker_factory: Any,
        session: aiohttp.ClientSession, webhooks: Webhooks) -> None:
    """As an orchestrator updates a deployment: each replica in turn gets SIGTERM and
    comes back on its port while jobs flow; its workers keep running their jobs and
    send their frames again on the next link. Every job ends once, succeeded."""
    a = await replicas(nats.url, lease=ROLLING_LEASE).ready(session)
    b = await replicas(nats.url, lease=ROLLING_LEASE).ready(session)
    wa = worker_factory(DOUBLE, worker_env(a, "g", "link"))
    wb = worker_factory(DOUBLE, worker_env(b, "g", "link"))
    await wait_worker(session, a, "g", wa)
    await wait_worker(session, b, "g", wb)
    live = [a, b]
    tally = Tally()
    for i in range(120 * SCALE):
        if i in (40 * SCALE, 80 * SCALE):  # a's turn, then b's
            old = live[0 if i == 40 * SCALE else 1]
            await old.stop(4)  # (at most the links' drain with jobs running: not 5 s grace)
            live[live.index(old)] = await replicas(nats.url, port=old.port,
                                                   lease=ROLLING_LEASE).ready(session)
        await submit_async(session, live[i % 2].url, "g", {"x": i, "sleep": 0.05},
                           webhooks.url, tally)
    await settle(session, live[0].url, "g", tally, within=30 * SCALE)
    # (a worker's webhook call retries through a replica's restart: one each, in time)
    await until(lambda: len(hook_counts(webhooks)) >= 120 * SCALE, 30, "every webhook")
    await asyncio.sleep(0.5)  # late webhooks would show duplicates
    tally.hooks = hook_counts(webhooks)
    print("rolling restart (SIGTERM):", tally.report())
    assert not tally.lost and not tally.duplicated, tally.report()
    assert tally.refused == 0
    assert set(tally.final.values()) == {"succeed"}, tally.report()
    assert all(n == 1 for n in tally.hooks.values()) and len(tally.hooks) == 120 * SCALE


async def test_all_replicas_restarted_lose_nothing(nats: TempNats,
                                                   replicas: Callable[..., Replica],
                                                   worker_factory: Any,
                                                   session: aiohttp.ClientSession,
                                                   webhooks: Webhooks) -> None:
    first = [await replicas(nats.url).ready(session) for _ in range(2)]
    tally = Tally()
    for i in range(40 * SCALE):
        await submit_async(session, first[i % 2].url, "r", {"x": i}, webhooks.url, tally)
    for r in first:
        r.kill()
    second = [await replicas(nats.url).ready(session) for _ in range(2)]
    code = 0
    async with session.get(f"{second[0].url}/v1/r/status", headers=AUTH) as resp:
        code, queued = resp.status, await resp.json()
    assert (code, queued) == (200, {"queueingCount": 40 * SCALE})
    worker = worker_factory(DOUBLE, worker_env(second[1], "r", "link"))
    await wait_worker(session, second[1], "r", worker)
    await settle(session, second[0].url, "r", tally, within=30 * SCALE)
    tally.hooks = hook_counts(webhooks)
    print("all replicas restarted:", tally.report())
    assert not tally.lost and not tally.duplicated, tally.report()
    assert set(tally.final.values()) == {"succeed"}


async def test_worker_sigkilled_mid_job(nats: TempNats, replicas: Callable[..., Replica],
                                        worker_factory: Any, session: aiohttp.ClientSession,
                                        webhooks: Webhooks) -> None:
    a = await replicas(nats.url).ready(session)
    b = await replicas(nats.url).ready(session)
    doomed = worker_factory(DOUBLE, dict(worker_env(a, "w", "plain"), APP_CONCURRENCY="1"))
    await wait_worker(session, a, "w", doomed)
    tally = Tally()
    await submit_async(session, a.url, "w", {"x": 1, "sleep": 30}, webhooks.url, tally)
    running = tally.accepted[0]

    async def started() -> bool:
        async with session.get(f"{b.url}/v1/w/status", params={"requestID": running},
                               headers=AUTH) as resp:
            # (read through the other replica: 404 for an instant after the submit)
            return (await resp.json()).get("status") == "executing"
    await until(started, 15, "the long job running")
    for i in range(10 * SCALE):  # queued behind it
        await submit_async(session, b.url, "w", {"x": i}, webhooks.url, tally)
    for pid in doomed.child_pids():
        os.kill(pid, signal.SIGKILL)
    doomed.proc.send_signal(signal.SIGKILL)
    doomed.proc.wait(10)
    rescuer = worker_factory(DOUBLE, worker_env(b, "w", "link"))
    await wait_worker(session, b, "w", rescuer)
    await settle(session, b.url, "w", tally, within=30 * SCALE)
    await asyncio.sleep(0.5)
    tally.hooks = hook_counts(webhooks)
    print("worker SIGKILL:", tally.report())
    assert not tally.lost and not tally.duplicated, tally.report()
    assert tally.final[running] == "failed"
    async with session.get(f"{b.url}/v1/w/status", params={"requestID": running},
                           headers=AUTH) as resp:
        st = await resp.json()
    assert st["statusCode"] == 500 and "worker lost" in st["message"]
    assert all(tally.final[r] == "succeed" for r in tally.accepted[1:])


async def test_nats_restarted_under_load(nats: TempNats, replicas: Callable[..., Replica],
                                         worker_factory: Any,
                                         session: aiohttp.ClientSession) -> None:
    a = await replicas(nats.url).ready(session)
    b = await replicas(nats.url).ready(session)
    worker = worker_factory(DOUBLE, worker_env(b, "n", "link"))
    await wait_worker(session, a, "n", worker)
    answers: Counter[str] = Counter()
    slowest = 0.0
    stop = asyncio.Event()

    async def client(i: int) -> None:
        nonlocal slowest
        while not stop.is_set():
            began = time.monotonic()
            try:
                async with session.post(f"{(a, b)[i % 2].url}/v1/n/sync", headers=AUTH,
                                        json={"input": {"x": i}},
                                        timeout=aiohttp.ClientTimeout(total=60)) as resp:
                    await resp.read()
                    answers[str(resp.status)] += 1
            except (TimeoutError, aiohttp.ClientError) as exc:
                answers[type(exc).__name__] += 1
                await asyncio.sleep(0.05)
            slowest = max(slowest, time.monotonic() - began)

    clients = [asyncio.create_task(client(i)) for i in range(4)]
    await asyncio.sleep(1.0)
    nats.server.kill()
    await asyncio.sleep(1.0)
    nats.server.start()
    await asyncio.sleep(SCALE - 1)  # long variant: more load after the restart
    ok_before = answers["200"]

    async def recovered() -> bool:
        return answers["200"] > ok_before + 20
    await until(recovered, 40, "sync requests succeeding again after the NATS restart")
    stop.set()
    await asyncio.wait_for(asyncio.gather(*clients), 70)
    print("NATS restart:", dict(answers), f"slowest call {slowest:.1f} s")
    assert slowest < 60  # errors or waits, never a hang
