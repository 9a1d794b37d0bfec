"""Cancels down the worker link, as the link transport hears them: a running job is
stopped by the job loop at once, and a job handed over but not started yet is
marked so that it never starts (its cancel can come in the same read as the job)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from spirit_gpu.supervisor.jobs import metric
from spirit_gpu.supervisor.transports.link import LinkTransport
from tests.conftest import until
from tests.gateway.conftest import BOTH_STORES, Gw
from tests.gateway.test_link_resend import pulled, submit


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def linked(gw: Gw, session: aiohttp.ClientSession, sid: str,
                 running: bool) -> tuple[LinkTransport, list[str]]:
    """A link of ``sid`` whose job loop stand-in answers each cancel with ``running``
    (it stopped a running job, or nothing of it runs here); the ids it was asked."""
    link = LinkTransport(session, f"{gw.url}/agent/{sid}")
    await link.connect()
    asked: list[str] = []

    def cancel(request_id: str) -> bool:
        asked.append(request_id)
        return running
    link.on_cancel(cancel)
    return link, asked


@BOTH_STORES
async def test_a_job_cancelled_before_it_started_is_marked_not_to_start(
        gw: Gw, session: aiohttp.ClientSession) -> None:
    link, asked = await linked(gw, session, "lc", running=False)
    rid = await submit(gw, "lc")
    job = await pulled(link)  # handed over; the job loop has not started it
    code, _, _ = await gw.call("DELETE", "/v1/lc/async", params={"requestID": rid})
    assert code == 200
    await until(lambda: job.cancelled, 10, "the handed-over job marked cancelled")
    assert asked == [rid]  # the job loop was asked first: nothing of it ran
    await link.close()


@BOTH_STORES
async def test_a_started_job_is_left_to_the_job_loop(
        gw: Gw, session: aiohttp.ClientSession) -> None:
    link, stopped = await linked(gw, session, "ls", running=True)
    rid = await submit(gw, "ls")
    job = await pulled(link)
    await link.metric(job, metric(job, "executing"))  # the job loop starts it
    code, _, _ = await gw.call("DELETE", "/v1/ls/async", params={"requestID": rid})
    assert code == 200
    await until(lambda: stopped == [rid], 10, "the job loop asked to stop it")
    assert not job.cancelled
    await link.close()
