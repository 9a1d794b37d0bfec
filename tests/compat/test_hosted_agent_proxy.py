"""Our worker in proxy mode against a stand-in of the hosted agent (DESIGN.md 5a): no
registration, so proxied requests arrive as queue jobs and are answered on request-proxy."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from spirit_gpu.config import WorkerConfig
from spirit_gpu.supervisor.proxy.worker import serve_proxy
from tests.compat.hosted_agent import HostedAgent
from tests.conftest import free_port, until
from tests.proxy.conftest import http_check
from tests.proxy.fake_llm import FakeLLM

Start = Callable[..., Awaitable[None]]


@pytest.fixture
async def start_worker(hosted_agent: HostedAgent) -> AsyncIterator[Start]:
    running: list[tuple[asyncio.Event, asyncio.Task[int]]] = []

    async def start(base_url: str, always_ready: bool = False) -> None:
        cfg = WorkerConfig(agent_url=hosted_agent.url, heartbeat_interval=0.1,
                           pull_backoff_max=0.05, grace_period=2.0)
        stop = asyncio.Event()

        async def ready() -> tuple[bool, str]:
            return True, ""
        check = ready if always_ready else http_check(base_url)
        running.append((stop, asyncio.create_task(serve_proxy(cfg, base_url, check, stop))))

    yield start
    for stop, task in running:
        stop.set()
        assert await asyncio.wait_for(task, 15) == 0


async def finished(agent: HostedAgent, rid: str) -> None:
    async def acked() -> bool:
        return rid in agent.acks
    await until(acked, 15, f"the ack of {rid}")


async def test_streamed_answer_arrives_as_it_is_written(
        hosted_agent: HostedAgent, llm: FakeLLM, start_worker: Start) -> None:
    await start_worker(llm.url)
    gate = llm.gate("last")
    rid = hosted_agent.add_proxy("POST", "/api/generate",
                                 {"Content-Type": ["application/json"], "X-Gate": ["last"]},
                                 json.dumps({"chunks": 3, "delay": 0}).encode())

    async def first_chunk() -> bool:
        answer = hosted_agent.proxy.get(rid)
        return answer is not None and b"w0" in answer.body
    await until(first_chunk, 15, "the first chunk at the agent")
    answer = hosted_agent.proxy[rid]
    assert not answer.complete and not gate.is_set()
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("application/x-ndjson")
    assert answer.headers.get("Transfer-Encoding") == "chunked"
    gate.set()
    await finished(hosted_agent, rid)
    lines = answer.body.splitlines()
    assert len(lines) == 4 and json.loads(lines[-1])["done"] is True
    assert hosted_agent.statuses(rid) == ["executing", "succeed"]
    assert llm.seen[-1]["headers"]["X-Gate"] == "last"


async def test_whole_answer_and_upstream_status(
        hosted_agent: HostedAgent, llm: FakeLLM, start_worker: Start) -> None:
    await start_worker(llm.url)
    ok = hosted_agent.add_proxy("POST", "/v1/chat/completions",
                                {"Content-Type": ["application/json"]},
                                json.dumps({"stream": False}).encode())
    missing = hosted_agent.add_proxy("GET", "/v1/nothing-here")
    await finished(hosted_agent, ok)
    await finished(hosted_agent, missing)
    answer = hosted_agent.proxy[ok]
    assert answer.status == 200 and "Content-Length" in answer.headers
    assert json.loads(answer.body)["choices"][0]["message"]["content"] == "hello"
    assert hosted_agent.statuses(ok) == ["executing", "succeed"]
    assert hosted_agent.proxy[missing].status == 404  # the upstream's status, passed on


async def test_bad_body_ttl_and_unreachable_upstream(
        hosted_agent: HostedAgent, start_worker: Start) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    await start_worker(dead, always_ready=True)
    bad = hosted_agent.add(b'{"input": {"not": "a proxy job"}}')
    old = hosted_agent.add_proxy("GET", "/v1/models", enqueue_at=1, ttl_ms=1000)
    down = hosted_agent.add_proxy("GET", "/v1/models")
    for rid in (bad, old, down):
        await finished(hosted_agent, rid)

    assert hosted_agent.statuses(bad) == ["failed"]
    assert "failed to parse proxy job" in hosted_agent.metrics[bad][0]["message"]
    assert bad not in hosted_agent.proxy and bad not in hosted_agent.results

    assert hosted_agent.proxy[old].status == 408
    assert "time to live" in json.loads(hosted_agent.proxy[old].body)["error"]
    assert hosted_agent.statuses(old) == ["failed"]

    assert hosted_agent.proxy[down].status == 500
    assert "unreachable" in json.loads(hosted_agent.proxy[down].body)["error"]
    assert hosted_agent.statuses(down) == ["executing", "failed"]
    # it asked for the registration extension first, and fell back on the plain protocol
    assert "POST /apis/v1/proxy/register" in hosted_agent.calls


async def test_heartbeats_name_running_proxy_jobs(
        hosted_agent: HostedAgent, llm: FakeLLM, start_worker: Start) -> None:
    await start_worker(llm.url)
    gate = llm.gate("hold")
    rid = hosted_agent.add_proxy("POST", "/api/generate", {"X-Gate-First": ["hold"]},
                                 json.dumps({"chunks": 2}).encode())

    async def named() -> bool:
        return any(rid in beat for beat in hosted_agent.heartbeats)
    await until(named, 15, "a heartbeat naming the running proxy job")
    gate.set()
    await finished(hosted_agent, rid)
    assert hosted_agent.statuses(rid) == ["executing", "succeed"]
