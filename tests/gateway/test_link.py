"""LinkTransport (worker side) against a real gateway: the multiplexed link."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from spirit_gpu.protocol import link as lp
from spirit_gpu.supervisor.jobs import Job, metric
from spirit_gpu.supervisor.transports.base import AgentUnavailable
from spirit_gpu.supervisor.transports.link import LinkTransport
from tests.conftest import until
from tests.gateway.conftest import AUTH, BOTH_STORES, TOKEN, GatewayFactory, Gw

pytestmark = BOTH_STORES

HOOK = "http://127.0.0.1:9/h"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def submit(gw: Gw, sid: str, value: object) -> str:
    code, body, _ = await gw.call("POST", f"/v1/{sid}/async",
                                  json_body={"input": value, "webhook": HOOK})
    assert code == 200
    return str(body["id"])


async def pull_until(link: LinkTransport, n: int, limit: int) -> list[Job]:
    jobs: list[Job] = []
    deadline = time.monotonic() + 10
    while len(jobs) < n:
        assert time.monotonic() < deadline, f"got {len(jobs)} of {n} jobs"
        jobs += (await link.pull(limit - len(jobs))).jobs
    return jobs


async def running_job(gw: Gw, session: aiohttp.ClientSession,
                      sid: str) -> tuple[LinkTransport, str]:
    """A link that took one job and reported it executing."""
    link = LinkTransport(session, f"{gw.url}/agent/{sid}")
    await link.connect()
    rid = await submit(gw, sid, 1)
    (job,) = await pull_until(link, 1, 1)
    job.started_at = job.received_at
    await link.metric(job, metric(job, "executing"))
    return link, rid


async def _status(gw: Gw, sid: str, rid: str, want: str) -> bool:
    return bool((await gw.status(sid, rid))["status"] == want)


async def test_connect_refused_without_token(gateway_factory: GatewayFactory,
                                             session: aiohttp.ClientSession) -> None:
    gw = await gateway_factory(worker_token=TOKEN)
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await LinkTransport(session, f"{gw.url}/agent/s").connect()
    ok = LinkTransport(session, f"{gw.url}/agent/s", TOKEN)
    await ok.connect()
    assert {"longpoll", "stream", "cancel", "link"} <= ok.features
    await ok.close()
    with pytest.raises(aiohttp.ClientError):
        await LinkTransport(session, "http://127.0.0.1:9/agent/s").connect()


async def test_jobs_results_chunks_and_many_in_flight(gw: Gw,
                                                      session: aiohttp.ClientSession) -> None:
    link = LinkTransport(session, f"{gw.url}/agent/ln")
    await link.connect()
    started = time.monotonic()
    assert (await link.pull(1)).jobs == []  # nothing queued: answers after about a second
    assert 0.5 < time.monotonic() - started < 5
    ids = [await submit(gw, "ln", i) for i in range(20)]
    jobs = await pull_until(link, 20, 20)
    assert [j.request_id for j in jobs] == ids
    # the webhook is the gateway's relay, as on the plain protocol (the first end wins)
    relay = f"{gw.url}/agent/ln/apis/v1/webhook/{ids[0]}"
    assert jobs[0].mode == "async" and jobs[0].webhook == relay and jobs[0].ttl_ms == 900_000
    assert jobs[0].body == b'{"input": 0, "webhook": "http://127.0.0.1:9/h"}'
    for job in jobs:
        job.started_at = job.received_at
        await link.metric(job, metric(job, "executing"))
    assert (await gw.status("ln", ids[5]))["status"] == "executing"
    await link.chunk(jobs[0], 0, b'{"i": 0}')
    await asyncio.gather(*(link.result(j, 200, "", b'{"n": %d}' % i)
                           for i, j in enumerate(jobs)))
    for j in jobs:
        await link.ack(j)

    async def all_done() -> bool:
        return all([(await gw.status("ln", i))["status"] == "succeed" for i in ids])
    await until(all_done, 5, "results over the link")
    async with gw.session.get(f"{gw.url}/v1/ln/stream", params={"requestID": ids[0]},
                              headers=AUTH) as resp:
        assert (await resp.read()).startswith(b'id: 0\ndata: {"i": 0}\n\n')
    await link.close()


async def test_cancel_is_pushed_and_reported_in_heartbeat(
        gw: Gw, session: aiohttp.ClientSession) -> None:
    link = LinkTransport(session, f"{gw.url}/agent/lc")
    await link.connect()
    rid = await submit(gw, "lc", 1)
    (job,) = await pull_until(link, 1, 1)
    job.started_at = job.received_at
    await link.metric(job, metric(job, "executing"))
    assert (await link.heartbeat([rid])).cancel == []
    code, _, _ = await gw.call("DELETE", "/v1/lc/async", params={"requestID": rid})
    assert code == 200

    async def told() -> list[str]:
        return (await link.heartbeat([rid])).cancel
    assert await until(told, 5, "cancel over the link") == [rid]
    await link.result(job, 499, "cancelled", b"")
    st = await gw.status("lc", rid)
    assert (st["status"], st["statusCode"]) == ("cancelled", 499)
    await link.close()


async def test_reconnects_and_gateway_redelivers_lost_jobs(
        gateway_factory: GatewayFactory, session: aiohttp.ClientSession) -> None:
    gw = await gateway_factory(lease_seconds=0.3)
    link = LinkTransport(session, f"{gw.url}/agent/lr")
    await link.connect()
    first = await submit(gw, "lr", 1)
    (job,) = await pull_until(link, 1, 1)
    assert job.request_id == first
    assert link._ws is not None
    await link._ws.close()  # the connection drops; the job never started

    async def relinked() -> bool:
        try:
            jobs = (await link.pull(1)).jobs
        except AgentUnavailable:
            return False
        return bool(jobs) and jobs[0].request_id == first
    await until(relinked, 10, "redelivery on a new link")
    await link.close()


async def test_worker_gone_mid_job_fails_the_job(gateway_factory: GatewayFactory,
                                                 session: aiohttp.ClientSession) -> None:
    gw = await gateway_factory(lease_seconds=0.3)
    link, rid = await running_job(gw, session, "lg")
    await link.close()
    await until(lambda: _status(gw, "lg", rid, "failed"), 5, "lease expiry")
    assert "worker lost" in (await gw.status("lg", rid))["message"]


async def test_a_cut_link_resends_a_turns_frames_together_and_in_order(
        gw: Gw, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch) -> None:
    from spirit_gpu.gateway import link_server
    from spirit_gpu.protocol import link as lp

    seen: list[tuple[str, str]] = []  # (frame, request id) in the order the gateway reads them
    original = lp.decode_all

    def record(data: bytes) -> list[lp.Frame]:
        frames = original(data)
        seen.extend((f"{type(f).__name__}:{getattr(f, 'status', '')}", f.request_id)
                    for f in frames if isinstance(f, lp.Metric | lp.Result | lp.Ack))
        return frames
    monkeypatch.setattr(link_server.lp, "decode_all", record)

    link = LinkTransport(session, f"{gw.url}/agent/lx")
    await link.connect()
    ids = [await submit(gw, "lx", i) for i in range(3)]
    jobs = await pull_until(link, 3, 3)
    ws = link._ws
    assert ws is not None
    # one loop turn: each job's metrics, result and ack are queued, then the socket dies
    # under them before the turn's message is written
    for job in jobs:
        job.started_at = job.received_at
        await link.metric(job, metric(job, "executing"))
        await link.result(job, 200, "", b'{"ok": true}')
        await link.metric(job, metric(job, "succeed"))
        await link.ack(job)
    ws._writer.transport.abort()  # aiohttp's socket transport: a cut connection

    async def all_done() -> bool:
        return all([(await gw.status("lx", i))["status"] == "succeed" for i in ids])
    await until(all_done, 10, "results resent on a new link")
    assert link._ws is not ws  # they went over a new connection
    expected = [(what, j.request_id) for j in jobs
                for what in ("Metric:executing", "Result:", "Metric:succeed", "Ack:")]
    assert seen == expected
    for i in ids:
        assert base64.b64decode((await gw.status("lx", i))["result"]) == b'{"ok": true}'
    await link.close()


async def test_a_new_link_takes_over_a_running_job_with_its_heartbeat_and_chunks_at_once(
        gateway_factory: GatewayFactory, session: aiohttp.ClientSession) -> None:
    # the worker's link was cut mid-job; on its next link the first message names the
    # job in a heartbeat and brings the job's next chunks: none is refused, whichever
    # of the two is handled first
    gw = await gateway_factory(lease_seconds=5.0)
    first, rid = await running_job(gw, session, "to")
    await until(lambda: _status(gw, "to", rid, "executing"), 5, "the job executing")
    await first.close()
    async with session.ws_connect(f"{gw.url}/agent/to/apis/v1/link",
                                  headers={lp.BATCH_HEADER: "1"}) as ws:
        assert isinstance(lp.decode((await ws.receive()).data), lp.Welcome)
        chunks: list[lp.Frame] = [lp.Chunk(request_id=rid, seq=i, data=b'{"i": %d}' % i)
                                  for i in range(3)]
        await ws.send_bytes(lp.encode_many(
            [chunks[0], lp.Heartbeat(request_ids=[rid]), *chunks[1:],
             lp.Result(request_id=rid, status_code=200, message="", data=b'"ok"'),
             lp.Ack(request_id=rid)]))
        await until(lambda: _status(gw, "to", rid, "succeed"), 5, "the job succeeding")
    async with session.get(f"{gw.url}/v1/to/stream", params={"requestID": rid},
                           headers=AUTH) as resp:
        body = await resp.text()
    assert [line for line in body.splitlines() if line.startswith("id: ")] == \
        ["id: 0", "id: 1", "id: 2"], body

