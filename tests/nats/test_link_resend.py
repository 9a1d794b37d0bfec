"""A replica that dies holding a linked worker's frames it never stored: the worker
sends them again to the next replica, and the stream has every chunk once."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import nats as nats_lib

from spirit_gpu.gateway.storage.nats import names
from tests.conftest import until
from tests.gateway.conftest import APPS, AUTH, Webhooks
from tests.nats.replicas import Replica, worker_env
from tests.nats.test_failures import (  # noqa: F401 - fixtures
    nats,
    replicas,
    session,
    wait_worker,
)
from tests.nats_server import TempNats

CHUNKS = str(APPS / "chunks.py")
PAD = 48 * 1024  # one chunk this large shows in the stopped replica's socket buffer
LEASE = 15.0  # longer than the test's outage: the job must not be failed as lost


def unread_bytes(port: int) -> int:
    """Bytes received and not yet read by the process listening on ``port``, summed
    over its established connections (the kernel's own count, /proc/net/tcp)."""
    total = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, queues = fields[1], fields[3], fields[4]
        if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
            total += int(queues.split(":")[1], 16)
    return total


async def read_status(http: aiohttp.ClientSession, replica: Replica, sid: str,
                      rid: str) -> str:
    async with http.get(f"{replica.url}/v1/{sid}/status", params={"requestID": rid},
                           headers=AUTH) as resp:
        # (read through another replica: 404 for an instant after the submit)
        return str((await resp.json()).get("status", ""))


async def stream_once_done(http: aiohttp.ClientSession, replica: Replica, sid: str,
                           rid: str, worker: Any) -> str:
    """The request's whole SSE stream, read through ``replica`` once it succeeded."""
    async def succeeded() -> bool:
        return await read_status(http, replica, sid, rid) == "succeed"
    await until(succeeded, 30, "the request succeeding", detail=lambda: worker.output)
    async with http.get(f"{replica.url}/v1/{sid}/stream", params={"requestID": rid},
                           headers=AUTH) as resp:
        return (await resp.read()).decode()


async def test_a_chunk_the_dead_replica_never_stored_reaches_the_stream_through_the_next(
        nats: TempNats, replicas: Callable[..., Replica], worker_factory: Any,  # noqa: F811
        session: aiohttp.ClientSession, webhooks: Webhooks, tmp_path: Path) -> None:  # noqa: F811
    a = await replicas(nats.url, lease=LEASE).ready(session)
    b = await replicas(nats.url, lease=LEASE).ready(session)
    worker = worker_factory(CHUNKS, worker_env(a, "lr", "link"))
    await wait_worker(session, b, "lr", worker, {"n": 1})
    gate = tmp_path / "gate"
    async with session.post(f"{b.url}/v1/lr/async", headers=AUTH, json={
            "input": {"n": 3, "gate": str(gate), "pad": PAD}, "webhook": webhooks.url}) as resp:
        assert resp.status == 200
        rid = (await resp.json())["id"]

    async def executing() -> bool:  # through b: the record in NATS says so
        return await read_status(session, b, "lr", rid) == "executing"
    await until(executing, 15, "the stream running")
    # replica a stops reading: chunk 1 reaches its socket and is never handled
    os.kill(a.proc.pid, signal.SIGSTOP)
    (tmp_path / "gate.0").touch()
    await until(lambda: unread_bytes(a.port) >= PAD, 15, "chunk 1 unread in a's socket",
                detail=lambda: worker.output)
    a.kill()
    replicas(nats.url, port=a.port, lease=LEASE)  # the next replica behind a's address
    (tmp_path / "gate.1").touch()  # chunk 2 comes while the worker has no link
    (tmp_path / "gate.2").touch()

    body = await stream_once_done(session, b, "lr", rid, worker)
    ids = [int(i) for i in re.findall(r"^id: (\d+)$", body, re.M)]
    items = [int(i) for i in re.findall(r'^data: \{"i": ?(\d+)', body, re.M)]
    assert (ids, items) == ([0, 1, 2], [0, 1, 2]), re.sub("x{20,}", "x..", body)
    assert body.endswith('event: end\ndata: {"statusCode":200,"status":"succeed"}\n\n')


async def test_a_job_whose_delivery_died_unrecorded_with_its_replica_runs_once_whole(
        nats: TempNats, replicas: Callable[..., Replica], worker_factory: Any,  # noqa: F811
        session: aiohttp.ClientSession, webhooks: Webhooks, tmp_path: Path) -> None:  # noqa: F811
    # a replica writes a delivery down a moment after handing it over; one that dies in
    # that moment leaves the job looking queued. The worker running it reports it to the
    # next replica, which must take its frames and not hand the job out again when the
    # stream delivers it anew (its lease ran out: nobody could extend it). That holds
    # when the worker reaches the next replica within the lease (as scaling.md says);
    # the lease leaves room for a replica's start on a loaded machine.
    lease = 6.0
    a = await replicas(nats.url, lease=lease).ready(session)
    b = await replicas(nats.url, lease=lease).ready(session)
    worker = worker_factory(CHUNKS, worker_env(a, "ad", "link"))
    await wait_worker(session, b, "ad", worker, {"n": 1})
    gate, runs = tmp_path / "gate", tmp_path / "runs"
    async with session.post(f"{b.url}/v1/ad/async", headers=AUTH, json={
            "input": {"n": 3, "gate": str(gate), "runs": str(runs), "stop": a.proc.pid},
            "webhook": webhooks.url}) as resp:
        assert resp.status == 200
        rid = (await resp.json())["id"]
    await until(lambda: runs.exists(), 15, "the job running", detail=lambda: worker.output)
    # the handler stopped a as it started: its delivery was never written down
    assert await read_status(session, b, "ad", rid) == "queueing", "stopped too late"
    a.kill()
    replicas(nats.url, port=a.port, lease=lease)  # the next replica behind a's address
    (tmp_path / "gate.0").touch()  # chunk 1 reaches the next replica
    async def adopted() -> bool:
        return await read_status(session, b, "ad", rid) == "executing"
    await until(adopted, 20, "the job recorded as the worker's", detail=lambda: worker.output)
    # a second worker pulls: the stream delivers the job again once its lease ran out
    other = worker_factory(CHUNKS, worker_env(b, "ad", "link"))
    await wait_worker(session, b, "ad", other, {"n": 1})
    seen: list[Any] = []

    async def delivered_again() -> bool:
        info = await js.consumer_info(names.JOBS, names.consumer("ad"))
        seen.append(info)
        return info.num_redelivered >= 1
    nc = await nats_lib.connect(nats.url)
    js = nc.jetstream()
    try:
        await until(delivered_again, 20, "the job delivered again", detail=lambda: f"{seen[-1]}")
    finally:
        await nc.close()
    (tmp_path / "gate.1").touch()
    (tmp_path / "gate.2").touch()

    body = await stream_once_done(session, b, "ad", rid, worker)
    ids = [int(i) for i in re.findall(r"^id: (\d+)$", body, re.M)]
    assert ids == [0, 1, 2], body
    assert runs.read_text() == "run\n"  # handed out once
