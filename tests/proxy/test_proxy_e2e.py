"""End to end: client -> real gateway -> real supervisor (``python -m spirit_gpu.supervisor``,
the user's script in a handler process for check_start) -> fake LLM server."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Worker as Supervisor
from tests.conftest import until, wait_exit
from tests.proxy.conftest import AUTH, BOTH_STORES, SID, Gateway
from tests.proxy.fake_llm import FakeLLM

APP = str(Path(__file__).parent / "apps" / "proxy_app.py")
MakeGateway = Callable[..., Awaitable[Gateway]]
TOKEN = "wt"


def env_for(gateway: Gateway, llm: FakeLLM, **extra: str) -> dict[str, str]:
    return {"EASE_AGENT_URL": gateway.agent_url(), "SPIRIT_WORKER_TOKEN": TOKEN,
            "EASE_HEARTBEAT_INTERVAL": "0.1", "LLM_URL": llm.url, **extra}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@BOTH_STORES
async def test_check_start_gates_then_streams(llm: FakeLLM, make_gateway: MakeGateway,
                                              worker_factory: Any, tmp_path: Path) -> None:
    gateway = await make_gateway(worker_token=TOKEN)
    flag = tmp_path / "ready"
    sup: Supervisor = worker_factory(APP, env_for(gateway, llm, READY_FLAG=str(flag)))
    await until(lambda: len(gateway.router.registry.workers(SID)) == 1, 30,
                what="registration (not ready)")
    await until(lambda: "model still loading" in sup.output, 15, what="check_start error log")
    assert gateway.ready_workers() == []
    async with aiohttp.ClientSession() as s:
        async with s.post(gateway.url + "/api/generate", json={}, headers=AUTH) as r:
            assert r.status == 503 and await r.json() == {"error": "not enough gpu now"}
        flag.touch()
        await until(lambda: len(gateway.ready_workers()) == 1, 15, what="ready")
        async with s.post(gateway.url + "/api/generate", json={"chunks": 3},
                          headers={**AUTH, "X-Gate": "g", "X-Tag": "e2e"}) as r:
            assert r.status == 200
            first = await r.content.readline()
            assert b'"w0 "' in first and "e2e" not in llm.finished
            llm.gate("g").set()
            assert (await r.read()).count(b"\n") == 3
        async with s.post(gateway.url + "/v1/chat/completions", headers=AUTH,
                          json={"stream": True, "chunks": 2}) as r:
            assert (await r.read()).endswith(b"data: [DONE]\n\n")
    assert all("auth" not in {k.lower() for k in seen["headers"]} for seen in llm.seen)
    assert "e2e" in sup.output or "proxy POST /api/generate -> 200" in sup.output
    sup.signal(signal.SIGTERM)
    assert await wait_exit(sup) == 0
    await until(lambda: gateway.router.registry.workers(SID) == [], 5, what="deregistered")


@BOTH_STORES
@pytest.mark.parametrize("transport", ["auto", "plain"], ids=["link", "http"])
async def test_sigkilled_worker_mid_stream(llm: FakeLLM, make_gateway: MakeGateway,
                                           worker_factory: Any, transport: str) -> None:
    gateway = await make_gateway(worker_token=TOKEN, lease_seconds=30.0)
    env = {"SPIRIT_TRANSPORT": transport}
    sups: list[Supervisor] = [worker_factory(APP, env_for(gateway, llm, **env)),
                              worker_factory(APP, env_for(gateway, llm, ASYNC_CHECK="1", **env))]
    await until(lambda: len(gateway.ready_workers()) == 2, 30, what="two ready workers")
    await until(lambda: gateway.linked() == (2 if transport == "auto" else 0), 10,
                what="proxy links")
    registry = gateway.router.registry
    async with aiohttp.ClientSession() as s:
        held = [await s.post(gateway.url + "/api/generate", json={"chunks": 3},
                             headers={**AUTH, "X-Gate": "hold"}) for _ in range(2)]
        assert [w.inflight for w in registry.workers(SID)] == [1, 1]  # one stream each
        assert [await r.content.readline() for r in held] != [b"", b""]
        # SIGKILL one of them (its listener port is in its log)
        victim_url = registry.workers(SID)[0].url
        port = victim_url.rsplit(":", 1)[1]
        victim = next(p for p in sups if f"127.0.0.1:{port} " in p.output)
        survivor = next(p for p in sups if p is not victim)
        children = victim.child_pids()
        victim.signal(signal.SIGKILL)
        llm.gate("hold").set()
        outcomes = []
        for r in held:
            try:
                async with asyncio.timeout(10):
                    await r.read()
                outcomes.append("complete")
            except aiohttp.ClientPayloadError:
                outcomes.append("ended with an error")
        assert sorted(outcomes) == ["complete", "ended with an error"]
        # the gateway stops routing to the dead worker at once (no waiting for the lease)
        assert len(gateway.ready_workers()) == 1
        assert gateway.ready_workers()[0].url != victim_url
        for _ in range(6):
            async with s.get(gateway.url + "/v1/models", headers=AUTH) as r:
                assert r.status == 200
    await until(lambda: not any(alive(pid) for pid in children), 10,
                what="the killed supervisor's handler process to exit")
    survivor.signal(signal.SIGTERM)
    assert await wait_exit(survivor) == 0


# memory only: the deadline is the worker's; the gateway only hears a worker not ready
async def test_start_deadline_exits_1(llm: FakeLLM, make_gateway: MakeGateway,
                                      worker_factory: Any, tmp_path: Path) -> None:
    gateway = await make_gateway(worker_token=TOKEN)
    sup: Supervisor = worker_factory(APP, env_for(
        gateway, llm, READY_FLAG=str(tmp_path / "never"), SPIRIT_START_DEADLINE="1.5"))
    assert await wait_exit(sup, 30) == 1
    assert "check_start did not return True within 1.5s" in sup.output
    assert gateway.ready_workers() == []


# memory only: refused by the token check, before the registry (nothing shared over NATS)
@pytest.mark.parametrize("token", ["", "wrong"])
async def test_worker_with_a_bad_token_gets_no_traffic(
        llm: FakeLLM, make_gateway: MakeGateway, worker_factory: Any, token: str) -> None:
    gateway = await make_gateway(worker_token=TOKEN)
    sup: Supervisor = worker_factory(APP, {**env_for(gateway, llm),
                                           "SPIRIT_WORKER_TOKEN": token})
    await until(lambda: "proxy registration refused by the agent" in sup.output, 30,
                what="refusal logged")
    assert gateway.router.registry.workers(SID) == []
