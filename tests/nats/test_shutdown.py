"""A gateway replica SIGTERMed with workers attached stops at once: long-polls end
with no job, links close (1001) instead of holding the shutdown's grace. With the
NATS store, a job running through a rolling restart still ends once, succeeded."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from spirit_gpu.gateway.storage.base import EXECUTING
from tests.conftest import Worker, until
from tests.gateway.conftest import AUTH
from tests.nats.replicas import DOUBLE, Replica, worker_env
from tests.nats_server import TempNats


@pytest.fixture
def nats() -> Any:
    server = TempNats()
    yield server
    server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def answered(session: aiohttp.ClientSession, replica: Replica, sid: str,
                   worker: Worker) -> None:
    async def up() -> bool:
        assert worker.proc.poll() is None, worker.output
        async with session.post(f"{replica.url}/v1/{sid}/sync", headers=AUTH,
                                json={"input": {"x": 1}}) as resp:
            return resp.status == 200
    await until(up, 30, f"the {sid} worker answering")


async def stop_within(replica: Replica, seconds: float) -> float:
    started = time.monotonic()
    replica.proc.send_signal(signal.SIGTERM)
    await asyncio.to_thread(replica.proc.wait, seconds)  # raises if it takes longer
    assert replica.proc.returncode == 0, replica.log.read_text()[-2000:]
    return time.monotonic() - started


@pytest.mark.parametrize("store", ["memory", "nats"])
async def test_a_replica_with_workers_attached_stops_at_once(
        store: str, nats: TempNats, tmp_path: Path, worker_factory: Callable[..., Worker],
        session: aiohttp.ClientSession) -> None:
    replica = await Replica(nats.url if store == "nats" else "memory",
                            tmp_path / "replica.log").ready(session)
    try:
        plain = worker_factory(DOUBLE, worker_env(replica, "p", "plain"))  # long-polls
        link = worker_factory(DOUBLE, worker_env(replica, "l", "link"))
        await answered(session, replica, "p", plain)
        await answered(session, replica, "l", link)
        # the shutdown's grace is 5 s: a long-poll or a link held it whole, or twice
        await stop_within(replica, 2.5)
    finally:
        replica.kill()


async def test_a_job_running_through_a_restart_ends_once(
        nats: TempNats, tmp_path: Path, worker_factory: Callable[..., Worker],
        session: aiohttp.ClientSession) -> None:
    replica = await Replica(nats.url, tmp_path / "replica.log", lease=3.0).ready(session)
    port = replica.port
    worker = worker_factory(DOUBLE, worker_env(replica, "r", "link"))
    try:
        await answered(session, replica, "r", worker)
        async with session.post(f"{replica.url}/v1/r/async", headers=AUTH, json={
                "input": {"x": 21, "sleep": 1.5}, "webhook": "http://127.0.0.1:9/x"}) as resp:
            rid = (await resp.json())["id"]

        async def running() -> bool:
            async with session.get(f"{replica.url}/v1/r/status", headers=AUTH,
                                   params={"requestID": rid}) as resp:
                return bool((await resp.json())["status"] == EXECUTING)
        await until(running, 10, "the job running")
        await stop_within(replica, 2.5)
        replica.kill()
        replica = await Replica(nats.url, tmp_path / "again.log", port=port,
                                lease=3.0).ready(session)

        async def ended() -> dict[str, Any] | None:
            async with session.get(f"{replica.url}/v1/r/status", headers=AUTH,
                                   params={"requestID": rid}) as resp:
                body = await resp.json()
            return body if body["status"] in ("succeed", "failed", "cancelled") else None
        status = await until(ended, 30, "the job's end")
        assert (status["status"], status["statusCode"]) == ("succeed", 200), status
    finally:
        replica.kill()
