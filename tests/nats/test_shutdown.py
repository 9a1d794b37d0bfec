"""A gateway replica SIGTERMed with workers attached stops at once: long-polls end
with no job, idle links close (1001) instead of holding the shutdown's grace. With
the NATS store, a job running through a restart still ends once, succeeded."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from spirit_gpu.gateway.storage.base import EXECUTING
from tests.conftest import Worker, until
from tests.gateway.conftest import AUTH
from tests.nats.replicas import DOUBLE, Replica, worker_env
from tests.nats.test_failures import nats, session, wait_worker  # noqa: F401 - fixtures
from tests.nats_server import TempNats


@pytest.mark.parametrize("store", ["memory", "nats"])
async def test_a_replica_with_workers_attached_stops_at_once(
        store: str, nats: TempNats, tmp_path: Path,  # noqa: F811
        worker_factory: Callable[..., Worker], session: aiohttp.ClientSession,  # noqa: F811
) -> None:
    replica = await Replica(nats.url if store == "nats" else "memory",
                            tmp_path / "replica.log").ready(session)
    try:
        plain = worker_factory(DOUBLE, worker_env(replica, "p", "plain"))  # long-polls
        link = worker_factory(DOUBLE, worker_env(replica, "l", "link"))
        await wait_worker(session, replica, "p", plain)
        await wait_worker(session, replica, "l", link)
        # the shutdown's grace is 5 s: a long-poll or a link held it whole, or twice
        await replica.stop(2.5)
    finally:
        replica.kill()


async def test_a_job_running_through_a_restart_ends_once(
        nats: TempNats, tmp_path: Path, worker_factory: Callable[..., Worker],  # noqa: F811
        session: aiohttp.ClientSession) -> None:  # noqa: F811
    replica = await Replica(nats.url, tmp_path / "replica.log", lease=3.0).ready(session)
    port = replica.port
    worker = worker_factory(DOUBLE, worker_env(replica, "r", "link"))
    try:
        await wait_worker(session, replica, "r", worker)
        async with session.post(f"{replica.url}/v1/r/async", headers=AUTH, json={
                "input": {"x": 21, "sleep": 1.5}, "webhook": "http://127.0.0.1:9/x"}) as resp:
            rid = (await resp.json())["id"]

        async def running() -> bool:
            async with session.get(f"{replica.url}/v1/r/status", headers=AUTH,
                                   params={"requestID": rid}) as resp:
                return bool((await resp.json())["status"] == EXECUTING)
        await until(running, 10, "the job running")
        await replica.stop(2.5)
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
