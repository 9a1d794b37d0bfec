"""End to end: gateway + real supervisor process + handler children, both transports."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from spirit_gpu.gateway.service import GATEWAY_KEY
from tests.conftest import Worker, free_port, until
from tests.gateway.conftest import APPS, AUTH, TOKEN, GatewayFactory, Gw, Webhooks

TRANSPORTS = ["plain", "link"]


async def start_worker(gw: Gw, worker_factory: Callable[..., Worker], sid: str, app: str,
                       transport: str, **env: str) -> Worker:
    full = {"EASE_AGENT_URL": f"{gw.url}/agent/{sid}", "EASE_HEARTBEAT_INTERVAL": "0.2",
            "SPIRIT_PULL_BACKOFF_MAX": "0.05", "SPIRIT_TRANSPORT": transport,
            "SPIRIT_WORKER_TOKEN": gw.config.worker_token, **env}
    worker = worker_factory(str(APPS / app), full)

    async def present() -> bool:
        assert worker.proc.poll() is None, worker.output
        return await gw.app[GATEWAY_KEY].storage.worker_count(sid) > 0
    await until(present, 20, "worker connected")
    if transport == "link":
        await output(worker, "multiplexed link")
    return worker


async def output(worker: Worker, text: str) -> None:
    """Wait for ``text`` in the worker's log without blocking the loop (the gateway runs in it)."""
    async def seen() -> bool:
        return text in worker.output
    await until(seen, 10, f"{text!r} in the worker log")


@pytest.fixture
async def tgw(gateway_factory: GatewayFactory) -> Gw:
    return await gateway_factory(worker_token=TOKEN, lease_seconds=1.0)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_sync_async_and_webhook(tgw: Gw, worker_factory: Any, webhooks: Webhooks,
                                      transport: str) -> None:
    await start_worker(tgw, worker_factory, "d", "double.py", transport)
    code, body, _ = await tgw.call("POST", "/v1/d/sync", json_body={"input": {"x": 21}})
    assert (code, body) == (200, {"doubled": 42})
    code, body, resp = await tgw.call("POST", "/v1/d/sync", json_body={"input": {"bytes": 1}})
    assert (code, body) == (200, b"\x00raw bytes")
    code, body, _ = await tgw.call("POST", "/v1/d/sync", json_body={"input": "not a dict"})
    assert code == 500 and "error" in body  # the handler failed: stored as the worker said
    many = await asyncio.gather(*(tgw.call("POST", "/v1/d/sync", json_body={"input": {"x": i}})
                                  for i in range(12)))
    assert [b for _, b, _ in many] == [{"doubled": 2 * i} for i in range(12)]

    code, acc, _ = await tgw.call("POST", "/v1/d/async", json_body={
        "input": {"x": 5}, "webhook": webhooks.url})
    (query, payload), = await webhooks.wait(1)
    assert query == {"requestID": acc["id"], "statusCode": "200"}
    assert json.loads(payload) == {"doubled": 10}

    async def done() -> dict[str, Any] | None:
        st = await tgw.status("d", acc["id"])
        return st if st["status"] == "succeed" else None
    st = await until(done, 10, "async status")
    assert st["statusCode"] == 200


async def test_a_worker_started_before_its_gateway_takes_the_link_once_it_is_up(
        gateway_factory: GatewayFactory, worker_factory: Any) -> None:
    port = free_port()
    worker = worker_factory(str(APPS / "double.py"), {
        "EASE_AGENT_URL": f"http://127.0.0.1:{port}/agent/early", "SPIRIT_TRANSPORT": "auto",
        "SPIRIT_WORKER_TOKEN": TOKEN, "EASE_HEARTBEAT_INTERVAL": "0.2"})
    await output(worker, "unreachable")  # nothing listens there yet
    gw = await gateway_factory(worker_token=TOKEN, port=port)
    await output(worker, "connected to the agent over the multiplexed link")
    code, body, _ = await gw.call("POST", "/v1/early/sync", json_body={"input": {"x": 4}})
    assert (code, body) == (200, {"doubled": 8})
    assert "using the plain protocol" not in worker.output


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_large_results_and_small_ones_arrive_whole_and_in_place(
        tgw: Gw, worker_factory: Any, transport: str) -> None:
    # several MiB per result: the link's writes wait for the socket to drain
    # while other requests' frames keep coming
    await start_worker(tgw, worker_factory, "d", "double.py", transport)
    size = 6 * 1024 * 1024
    calls = [tgw.call("POST", "/v1/d/sync", json_body={"input": {"x": i, "blob": size}})
             for i in range(1, 5)]
    calls += [tgw.call("POST", "/v1/d/sync", json_body={"input": {"x": i}}) for i in range(8)]
    answers = await asyncio.gather(*calls)
    for i, (code, body, _) in enumerate(answers[:4], start=1):
        assert code == 200 and body == bytes([i]) * size
    assert [b for _, b, _ in answers[4:]] == [{"doubled": 2 * i} for i in range(8)]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_sse_chunks_arrive_before_the_handler_ends(
        tgw: Gw, worker_factory: Any, webhooks: Webhooks, tmp_path: Path, transport: str) -> None:
    await start_worker(tgw, worker_factory, "g", "chunks.py", transport)
    gate = str(tmp_path / "gate")
    code, acc, _ = await tgw.call("POST", "/v1/g/async", json_body={
        "input": {"n": 3, "gate": gate}, "webhook": webhooks.url})
    async with tgw.session.get(f"{tgw.url}/v1/g/stream", params={"requestID": acc["id"]},
                               headers=AUTH) as resp:
        for i in range(3):
            event = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 15)
            assert event == b'id: %d\ndata: {"i":%d}\n\n' % (i, i)
            # the handler is still blocked on the gate: this chunk came before the end
            assert (await tgw.status("g", acc["id"]))["status"] == "executing"
            await asyncio.to_thread(Path(f"{gate}.{i}").touch)
        end = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 15)
        assert end == b'event: end\ndata: {"statusCode":200,"status":"succeed"}\n\n'
    st = await tgw.status("g", acc["id"])
    assert json.loads(base64.b64decode(st["result"])) == [
        {"i": 0}, {"i": 1}, {"i": 2}]


async def cancel_once_running(gw: Gw, webhooks: Webhooks, tmp_path: Path) -> str:
    """Submit a 60 s job to serverless id ``c`` (slow_async.py) and cancel it once the
    handler itself runs ("executing" shows from the dispatch on: a cancel before the
    start is another case); its request id."""
    started = tmp_path / "started"
    code, acc, _ = await gw.call("POST", "/v1/c/async", json_body={
        "input": {"sleep": 60, "started": str(started)}, "webhook": webhooks.url})
    assert code == 200
    await until(started.exists, 10, "the handler running")
    code, _, _ = await gw.call("DELETE", "/v1/c/async", params={"requestID": acc["id"]})
    assert code == 200
    return str(acc["id"])


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_cancel_running_request(tgw: Gw, worker_factory: Any, webhooks: Webhooks,
                                      transport: str, tmp_path: Path) -> None:
    worker = await start_worker(tgw, worker_factory, "c", "slow_async.py", transport)
    rid = await cancel_once_running(tgw, webhooks, tmp_path)
    st = await tgw.status("c", rid)
    assert (st["status"], st["statusCode"]) == ("cancelled", 499)
    await output(worker, "cancelling running request")
    # the worker is free again: a new request runs at once
    code, body, _ = await tgw.call("POST", "/v1/c/sync", json_body={"input": {"sleep": 0}})
    assert (code, body) == (200, {"slept": 0})


async def test_a_link_worker_stops_a_cancelled_job_before_its_next_heartbeat(
        gateway_factory: GatewayFactory, worker_factory: Any, webhooks: Webhooks,
        tmp_path: Path) -> None:
    # the gateway pushes the cancel down the link: the GPU is freed now, not a
    # heartbeat interval later (the plain protocol hears of it in a heartbeat reply)
    gw = await gateway_factory(worker_token=TOKEN)
    worker = await start_worker(gw, worker_factory, "c", "slow_async.py", "link",
                                EASE_HEARTBEAT_INTERVAL="60")
    await cancel_once_running(gw, webhooks, tmp_path)
    await output(worker, "cancelling running request")  # (10 s, not 60)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_dead_webhook_is_reported_in_the_relays_words(
        tgw: Gw, worker_factory: Any, transport: str, dead_port: int) -> None:
    # the worker's webhook goes through the gateway's relay, which tries the client's
    # URL itself and remembers the outcome: the worker reports that, once, not
    # "answered 502 (...)" after retrying an answer that cannot change
    await start_worker(tgw, worker_factory, "d", "double.py", transport,
                       SPIRIT_WEBHOOK_BACKOFF="0.05")
    code, acc, _ = await tgw.call("POST", "/v1/d/async", json_body={
        "input": {"x": 1}, "webhook": f"http://127.0.0.1:{dead_port}/hook"})
    assert code == 200

    async def noted() -> dict[str, Any] | None:
        st = await tgw.status("d", acc["id"])
        return st if "webhook" in st["message"] else None
    st = await until(noted, 30, "the webhook failure in the status")
    assert (st["status"], st["statusCode"]) == ("succeed", 200)
    assert st["message"].startswith("webhook delivery failed after 3 tries: webhook "
                                    "unreachable"), st["message"]
    assert st["message"].count("webhook delivery failed") == 1 and "502" not in st["message"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_worker_killed_mid_request_ends_the_request(
        gateway_factory: GatewayFactory, worker_factory: Any, transport: str) -> None:
    gw = await gateway_factory(lease_seconds=1.0, sync_timeout=6.0)
    worker = await start_worker(gw, worker_factory, "k", "double.py", transport)
    code, acc, _ = await gw.call("POST", "/v1/k/async", json_body={
        "input": {"sleep": 60}, "webhook": "http://127.0.0.1:9/h"})
    sync = asyncio.create_task(gw.call("POST", "/v1/k/sync",
                                       json_body={"input": {"sleep": 60, "x": 1}}))

    async def running() -> bool:
        storage = gw.app[GATEWAY_KEY].storage
        rec = await storage.get("k", acc["id"])
        stats = await storage.stats()
        # started: the worker reported "executing" (the link may hold that metric
        # back for a moment, so a job killed sooner is redelivered instead)
        return rec is not None and rec.started_at > 0 and stats[0].in_flight == 2
    await until(running, 10, "both requests running")
    pids = worker.child_pids()
    worker.signal(signal.SIGKILL)
    for pid in pids:  # the handler children go too (a killed machine)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    async def lost() -> dict[str, Any] | None:
        st = await gw.status("k", acc["id"])
        return st if st["status"] == "failed" else None
    st = await until(lost, 10, "async request failed")
    assert st["statusCode"] == 500 and "worker lost" in st["message"]
    # the sync client gets a terminal answer too: 500 when its job had started, else 408
    code, body, _ = await asyncio.wait_for(sync, 15)
    assert (code, "worker lost" in body["error"]) == (500, True) or code == 408


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_child_crash_is_reported(tgw: Gw, worker_factory: Any, transport: str) -> None:
    await start_worker(tgw, worker_factory, "x", "double.py", transport)
    code, body, _ = await tgw.call("POST", "/v1/x/sync", json_body={"input": {"exit": 3}})
    assert code >= 500 and "error" in body
    code, body, _ = await tgw.call("POST", "/v1/x/sync", json_body={"input": {"x": 2}})
    assert (code, body) == (200, {"doubled": 4})
