"""Webhooks in the background (a slow one holds no handler slot) and the target policy
on the worker's side."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from spirit_gpu.config import WorkerConfig
from spirit_gpu.net.relay import new_session
from spirit_gpu.supervisor.webhook import deliver, worker_policy
from tests.conftest import free_port, worker_env
from tests.fake_agent import FakeAgent


class HangingHook:
    """A webhook that accepts the request and never answers (until the test ends)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.release = asyncio.Event()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.calls.append(request.query.get("requestID", ""))
        await self.release.wait()
        return web.Response(status=200)


@pytest.fixture
async def hanging_hook() -> AsyncIterator[HangingHook]:
    hook = HangingHook()
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    hook.url = f"http://127.0.0.1:{port}/hook"
    yield hook
    hook.release.set()
    await runner.cleanup()


async def test_a_webhook_that_never_answers_holds_no_handler_slot(
        agent: FakeAgent, worker_factory, hanging_hook: HangingHook) -> None:
    for i in range(2):
        agent.enqueue(f"a{i}", {"input": {"x": i}, "webhook": hanging_hook.url}, mode="async")
    agent.enqueue("sync", {"input": {"x": 3}})
    # one handler slot; each webhook try may hang for a minute
    worker_factory("behave.py", worker_env(agent, SPIRIT_WEBHOOK_TIMEOUT="60",
                                           SPIRIT_WEBHOOK_ATTEMPTS="1"))
    await agent.wait_for(lambda: "sync" in agent.acks, 20)
    assert agent.results["sync"]["statusCode"] == 200
    # the async jobs' results are in, their webhooks still hang: no ack before delivery
    assert {"a0", "a1"} <= set(agent.results)
    assert not {"a0", "a1"} & set(agent.acks)
    assert len(hanging_hook.calls) == 2  # both under way at once, beside the sync job
    hanging_hook.release.set()
    await agent.wait_for(lambda: {"a0", "a1"} <= set(agent.acks), 20)
    assert agent.metrics["a0"][-1]["status"] == "succeed"


async def test_a_burst_past_the_webhook_queue_loses_no_webhook(
        agent: FakeAgent, worker_factory, hanging_hook: HangingHook) -> None:
    # one delivery at a time, one waiting: the rest of the burst waits for room
    # (holding its jobs' slots) instead of being dropped
    for i in range(6):
        agent.enqueue(f"b{i}", {"input": {"x": i}, "webhook": hanging_hook.url}, mode="async")
    worker_factory("behave.py", worker_env(agent, SPIRIT_WEBHOOK_CONCURRENCY="1",
                                           SPIRIT_WEBHOOK_QUEUE="1",
                                           SPIRIT_WEBHOOK_ATTEMPTS="1",
                                           APP_CONCURRENCY="6"))  # all six at once
    await agent.wait_for(lambda: len(hanging_hook.calls) == 1, 20)
    hanging_hook.release.set()
    done = {f"b{i}" for i in range(6)}
    await agent.wait_for(lambda: done <= set(agent.acks), 30)
    assert sorted(hanging_hook.calls) == sorted(done)
    assert all(agent.metrics[r][-1]["status"] == "succeed" for r in done)
    assert all("webhook" not in agent.metrics[r][-1]["message"] for r in done)


async def test_shutdown_waits_for_pending_webhooks_then_reports_them(
        agent: FakeAgent, worker_factory, hanging_hook: HangingHook) -> None:
    agent.enqueue("h", {"input": {}, "webhook": hanging_hook.url}, mode="async")
    w = worker_factory("behave.py", worker_env(agent, SPIRIT_WEBHOOK_TIMEOUT="60",
                                               SPIRIT_GRACE_PERIOD="0.5"))
    await agent.wait_for(lambda: hanging_hook.calls, 20)
    w.signal(15)
    await agent.wait_for(lambda: "h" in agent.acks, 20)
    message = agent.metrics["h"][-1]["message"]
    assert "webhook delivery failed" in message and "shut down" in message, message


@pytest.mark.parametrize(("target", "why"), [
    # only loopback is ever contacted, even by a worker without the policy: 0.0.0.0 is
    # refused as "unspecified" and reaches this machine; link-local and metadata
    # addresses are tests/gateway/test_webhook_policy.py's (no connection made there)
    ("http://0.0.0.0:{agent_port}/hook", "unspecified"),
    ("http://127.0.0.1:{agent_port}/agent/x/apis/v1/proxy/register", "agent API path"),
    ("http://127.0.0.1:{agent_port}/anything", "own listener"),
])
async def test_refused_webhook_targets_are_never_contacted(agent: FakeAgent, worker_factory,
                                                           target: str, why: str) -> None:
    port = agent.url.rsplit(":", 1)[1]
    agent.enqueue("r", {"input": {}, "webhook": target.format(agent_port=port)}, mode="async")
    worker_factory("behave.py", worker_env(agent))
    await agent.wait_for(lambda: "r" in agent.acks, 20)
    assert agent.results["r"]["statusCode"] == 200
    message = agent.metrics["r"][-1]["message"]
    assert "webhook delivery failed after 1 try: webhook refused" in message, message
    assert why in message
    assert not [c for c in agent.calls if "proxy/register" in c or "anything" in c]


async def test_the_allow_list_restricts_webhook_targets(agent: FakeAgent, worker_factory,
                                                        hanging_hook: HangingHook) -> None:
    agent.enqueue("no", {"input": {}, "webhook": hanging_hook.url}, mode="async")
    worker_factory("behave.py", worker_env(agent, SPIRIT_WEBHOOK_ALLOW="hooks.example.com"))
    await agent.wait_for(lambda: "no" in agent.acks, 20)
    assert "not in the allow-list" in agent.metrics["no"][-1]["message"]
    assert hanging_hook.calls == []
    assert json.loads(agent.result_body("no"))["y"] == 0


async def test_an_unreachable_relay_is_named_as_the_gateways() -> None:
    # a worker's webhook goes to its gateway's relay: when that is away, the status
    # must not blame the client's webhook
    agent = f"http://127.0.0.1:{free_port()}/agent/s"  # nothing listens there
    cfg = WorkerConfig(agent_url=agent, webhook_attempts=2, webhook_backoff=0.01)
    async with new_session() as session:
        note = await deliver(session, cfg, f"{agent}/apis/v1/webhook/r1", "r1", 200, b"{}",
                             worker_policy(cfg))
        other = await deliver(session, cfg, f"http://127.0.0.1:{free_port()}/hook", "r2", 200,
                              b"{}", worker_policy(cfg))
    assert note.startswith("webhook delivery failed after 2 tries: the gateway's webhook "
                           "relay unreachable"), note
    assert "after 2 tries: webhook unreachable" in other  # the client's own: as before


async def test_a_webhook_too_slow_to_answer_is_named_as_such(
        agent: FakeAgent, worker_factory, hanging_hook: HangingHook) -> None:
    agent.enqueue("slow", {"input": {}, "webhook": hanging_hook.url}, mode="async")
    worker_factory("behave.py", worker_env(agent, SPIRIT_WEBHOOK_TIMEOUT="0.3",
                                           SPIRIT_WEBHOOK_ATTEMPTS="1"))
    await agent.wait_for(lambda: "slow" in agent.acks, 20)
    message = agent.metrics["slow"][-1]["message"]
    assert message.endswith("webhook unreachable: TimeoutError"), message
