"""spirit_gpu.client and ``spirit-gpu call`` against a real gateway and a real worker."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web

from spirit_gpu.cli import banner
from spirit_gpu.client import (
    AsyncEndpoint,
    BadRequest,
    ConnectionFailed,
    Endpoint,
    JobFailed,
    NotFound,
    RequestTimeout,
    ResultTimeout,
    Retry,
    ServerError,
    ServiceUnavailable,
    Unauthorized,
    decode_result,
    error_for,
)
from spirit_gpu.gateway.service import GATEWAY_KEY
from tests.conftest import ROOT, Worker, free_port, until
from tests.gateway.conftest import APPS, KEY, TOKEN, GatewayFactory, Gw, Webhooks

FAST = Retry(attempts=3, base=0.01)


async def start_worker(gw: Gw, worker_factory: Callable[..., Worker], sid: str,
                       app: str) -> Worker:
    worker = worker_factory(str(APPS / app), {
        "EASE_AGENT_URL": f"{gw.url}/agent/{sid}", "EASE_HEARTBEAT_INTERVAL": "0.2",
        "SPIRIT_PULL_BACKOFF_MAX": "0.05", "SPIRIT_TRANSPORT": "plain",
        "SPIRIT_WORKER_TOKEN": TOKEN})

    async def present() -> bool:
        assert worker.proc.poll() is None, worker.output
        return await gw.app[GATEWAY_KEY].storage.worker_count(sid) > 0
    await until(present, 30, "worker connected")
    return worker


@pytest.fixture
async def tgw(gateway_factory: GatewayFactory) -> Gw:
    return await gateway_factory(worker_token=TOKEN, lease_seconds=2.0)


async def test_sync_endpoint_end_to_end(tgw: Gw, worker_factory: Any,
                                        webhooks: Webhooks) -> None:
    await start_worker(tgw, worker_factory, "d", "double.py")
    ep = Endpoint(tgw.url, "d", KEY, retry=FAST)
    assert await asyncio.to_thread(ep.run_sync, {"x": 21}) == {"doubled": 42}
    assert await asyncio.to_thread(ep.run_sync, {"bytes": 1}) == b"\x00raw bytes"
    with pytest.raises(ServerError) as failed:  # the handler raised: 500 with its message
        await asyncio.to_thread(ep.run_sync, "not a dict")
    assert failed.value.status == 500 and failed.value.message.startswith("AttributeError")

    job = await asyncio.to_thread(ep.submit, {"x": 5}, webhooks.url, 60)
    assert await asyncio.to_thread(job.result, 30) == {"doubled": 10}
    st = await asyncio.to_thread(job.status)
    assert (st.status, st.status_code, st.done) == ("succeed", 200, True)
    batch = await asyncio.to_thread(ep.statuses, [job.id, "nope"])
    assert [s.status for s in batch] == ["succeed", "notFound"]
    with pytest.raises(NotFound) as nf:
        await asyncio.to_thread(ep.status, "nope")
    assert nf.value.status == 404 and "not found" in nf.value.message
    assert await asyncio.to_thread(ep.queue_length) == 0

    slow = await asyncio.to_thread(ep.submit, {"sleep": 30}, webhooks.url)
    await asyncio.to_thread(slow.cancel)
    with pytest.raises(JobFailed) as cancelled:
        await asyncio.to_thread(slow.result, 30)
    assert cancelled.value.status == 499

    with pytest.raises(BadRequest) as bad:  # the platform requires a webhook for async
        await asyncio.to_thread(ep.submit, {"x": 1})
    assert bad.value.message == "webhook is empty for async request"
    with pytest.raises(Unauthorized):
        await asyncio.to_thread(Endpoint(tgw.url, "d", "wrong", retry=FAST).run_sync, 1)


async def test_stream_yields_items_as_they_come(tgw: Gw, worker_factory: Any,
                                                webhooks: Webhooks, tmp_path: Any) -> None:
    await start_worker(tgw, worker_factory, "c", "chunks.py")
    gate = str(tmp_path / "gate")
    ep = Endpoint(tgw.url, "c", KEY, retry=FAST)
    job = await asyncio.to_thread(ep.submit, {"n": 3, "gate": gate}, webhooks.url)

    def read_two_then_open() -> list[Any]:
        items = []
        for item in job.stream():
            items.append(item)
            # item i+1 only comes once the test opens gate i: each arrived on its own
            open(f"{gate}.{len(items) - 1}", "w").close()
        return items
    assert await asyncio.to_thread(read_two_then_open) == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert await asyncio.to_thread(job.result, 10) == [{"i": 0}, {"i": 1}, {"i": 2}]


async def test_async_endpoint(tgw: Gw, worker_factory: Any, webhooks: Webhooks) -> None:
    await start_worker(tgw, worker_factory, "c", "chunks.py")
    async with AsyncEndpoint(tgw.url, "c", KEY, retry=FAST) as ep:
        assert await ep.run_sync({"n": 2}) == [{"i": 0}, {"i": 1}]
        job = await ep.submit({"n": 3}, webhook=webhooks.url)
        assert [item async for item in job.stream()] == [{"i": 0}, {"i": 1}, {"i": 2}]
        assert await job.result(10) == [{"i": 0}, {"i": 1}, {"i": 2}]
        assert [s.status for s in await ep.statuses([job.id])] == ["succeed"]
        assert (await job.status()).status_code == 200
        assert await ep.queue_length() == 0
        with pytest.raises(NotFound):
            await ep.status("nope")
        failing = await ep.submit({"n": "x"}, webhook=webhooks.url)  # int("x") raises
        with pytest.raises(JobFailed) as failed:
            _ = [item async for item in failing.stream()]
        assert failed.value.status == 500 and "ValueError" in failed.value.message


async def test_unreachable_gateway_and_503_are_retried_then_typed(tgw: Gw) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionFailed) as exc:
        await asyncio.to_thread(Endpoint(dead, "s", KEY, retry=FAST).run_sync, 1)
    assert exc.value.status == 0 and "cannot reach" in exc.value.message
    async with AsyncEndpoint(dead, "s", KEY, retry=FAST) as aep:
        with pytest.raises(ConnectionFailed):
            await aep.status("x")
    async with AsyncEndpoint(tgw.url, "none", KEY, retry=FAST) as aep:
        with pytest.raises(ServiceUnavailable) as unavailable:
            await aep.run_sync(1)
    assert unavailable.value.status == 503 and "not enough gpu now" in unavailable.value.message


def test_error_mapping_and_result_decoding() -> None:
    assert isinstance(error_for(400, b'{"error": "bad"}'), BadRequest)
    e = error_for(401, b'{"error": {"message": "openai shape", "type": "x"}}')
    assert isinstance(e, Unauthorized) and e.message == "openai shape"
    assert error_for(502, b"<html>").message == "<html>"
    assert decode_result(b'{"a": 1}') == {"a": 1} and decode_result(b"\x00x") == b"\x00x"
    assert decode_result(None) is None
    assert list(Retry(attempts=4, base=1, factor=2, cap=3).delays()) == [1, 2, 3]


async def test_call_command(tgw: Gw, worker_factory: Any, webhooks: Webhooks) -> None:
    await start_worker(tgw, worker_factory, "c", "chunks.py")
    env = dict(os.environ, SPIRIT_GATEWAY_URL=tgw.url, SPIRIT_API_KEY=KEY)

    async def call(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "spirit_gpu.cli", "call", *args, cwd=ROOT, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode or 0, out.decode(), err.decode()

    code, out, _ = await call("c", '{"n": 2}')
    assert code == 0 and json.loads(out) == [{"i": 0}, {"i": 1}]
    code, out, _ = await call("c", '{"n": 2}', "--stream", "--webhook", webhooks.url)
    assert code == 0 and [json.loads(x) for x in out.splitlines()] == [{"i": 0}, {"i": 1}]
    code, out, _ = await call("c", '{"n": 1}', "--async", "--webhook", webhooks.url)
    accepted = json.loads(out)
    assert code == 0 and set(accepted) == {"id", "sequence"}

    ep = Endpoint(tgw.url, "c", KEY)
    await asyncio.to_thread(ep.job(accepted["id"]).result, 30)
    code, out, err = await call("c", "--status", accepted["id"])
    st = json.loads(out)
    assert (code, st["status"], st["statusCode"], st["result"]) == (0, "succeed", 200, [{"i": 0}])
    code, out, err = await call("c", '{"n": 1}', "--api-key", "wrong")
    assert code == 1 and out == "" and "spirit-gpu call: the request failed (401): " in err
    code, _, err = await call("c", "{not json")
    assert code == 2 and "not JSON" in err
    code, _, err = await call("c", "1", "--stream")
    assert code == 2 and "need --webhook" in err
    # the input after the options, as `spirit-gpu dev` prints the command
    code, out, _ = await call("c", "--url", tgw.url, "--api-key", KEY, '{"n": 1}')
    assert code == 0 and json.loads(out) == [{"i": 0}]
    printed = banner(tgw.url, "c", KEY, str(APPS / "chunks.py")).split("or: spirit-gpu call ")[1]
    code, out, err = await call(*shlex.split(printed.splitlines()[0]))
    assert code == 0 and json.loads(out) == [{"i": 0}, {"i": 1}, {"i": 2}], err


async def test_stream_gap_longer_than_timeout_is_a_typed_timeout(
        tgw: Gw, worker_factory: Any, webhooks: Webhooks, tmp_path: Any) -> None:
    await start_worker(tgw, worker_factory, "c", "chunks.py")
    gate = str(tmp_path / "never")  # item 1 waits for a gate nobody opens (30 s)
    ep = Endpoint(tgw.url, "c", KEY, retry=FAST)
    job = await asyncio.to_thread(ep.submit, {"n": 2, "gate": gate}, webhooks.url)

    def first_then_wait() -> list[Any]:
        items = []
        for item in job.stream(timeout=0.5):
            items.append(item)
        return items
    with pytest.raises(RequestTimeout) as gap:
        await asyncio.to_thread(first_then_wait)
    assert gap.value.status == 408 and "no stream event within 0.5 s" in gap.value.message
    async with AsyncEndpoint(tgw.url, "c", KEY, retry=FAST) as aep:
        with pytest.raises(RequestTimeout):
            _ = [item async for item in aep.job(job.id).stream(timeout=0.5)]
        with pytest.raises(RequestTimeout) as late:  # waiting for the result runs out too
            await aep.job(job.id).result(timeout=0.3)
        assert isinstance(late.value, ResultTimeout) and late.value.status == 408
    with pytest.raises(RequestTimeout):
        await asyncio.to_thread(job.result, 0.3)
    await asyncio.to_thread(job.cancel)


@pytest.mark.parametrize(("error", "tries"), [
    ("model still loading", 1),  # the handler's own 503: it ran; running it again is wrong
    ("not enough gpu now: no worker", FAST.attempts),  # nothing was queued: try again
])
async def test_a_503_is_tried_again_only_when_nothing_ran(error: str, tries: int) -> None:
    calls: list[str] = []

    async def sync(request: web.Request) -> web.Response:
        calls.append(request.path)
        return web.json_response({"error": error}, status=503)
    app = web.Application()
    app.router.add_post("/v1/x/sync", sync)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        with pytest.raises(ServiceUnavailable):
            await asyncio.to_thread(Endpoint(f"http://127.0.0.1:{port}", "x", KEY,
                                             retry=FAST).run_sync, 1)
        assert len(calls) == tries
        async with AsyncEndpoint(f"http://127.0.0.1:{port}", "x", KEY, retry=FAST) as aep:
            with pytest.raises(ServiceUnavailable):
                await aep.run_sync(1)
        assert len(calls) == 2 * tries
    finally:
        await runner.cleanup()
