"""The supervisor against a fake agent: the reference protocol, end to end."""

from __future__ import annotations

import json
import signal

from tests.conftest import wait_exit, worker_env
from tests.fake_agent import FakeAgent, now_ms

METRIC_KEYS = {"timestamp", "requestID", "webhook", "status", "operation", "enqueueTimestamp",
               "queueingDuration", "executionDuration", "totalDuration", "requestCreateAt",
               "message"}


async def test_sync_job_reports_result_metrics_and_ack_in_order(agent: FakeAgent,
                                                                worker_factory) -> None:
    agent.prefix = ""
    agent.enqueue("r1", {"input": {"x": 21}})
    worker_factory("behave.py", worker_env(agent))
    await agent.wait_for(lambda: "r1" in agent.acks)
    result = agent.results["r1"]
    assert set(result) == {"statusCode", "message", "data"}
    assert result["statusCode"] == 200
    body = json.loads(agent.result_body("r1"))
    assert body["y"] == 42
    assert body["meta"] == {"requestID": "r1"}
    statuses = [m["status"] for m in agent.metrics["r1"]]
    assert statuses == ["executing", "succeed"]
    for m in agent.metrics["r1"]:
        assert set(m) == METRIC_KEYS
        assert m["requestID"] == "r1" and m["operation"] == "sync"
    order = [c for c in agent.calls if "r1" in c]
    assert order[-1].startswith("POST /apis/v1/request-ack/r1")
    assert order.index("POST /apis/v1/request-result/r1") < order.index(
        "POST /apis/v1/request-ack/r1")


async def test_agent_path_prefix_and_worker_token(agent: FakeAgent, worker_factory) -> None:
    agent.prefix = "/agent/my-sid"
    # the app must be rebuilt with the prefix: the fixture serves the default app, so
    # route through a fresh agent app on the same object
    from aiohttp import web

    from tests.conftest import free_port
    runner = web.AppRunner(agent.app(), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    agent.url = f"http://127.0.0.1:{port}"
    try:
        agent.enqueue("p1", {"input": {"x": 1}})
        worker_factory("behave.py", worker_env(agent, SPIRIT_WORKER_TOKEN="s3cret"))
        await agent.wait_for(lambda: "p1" in agent.acks)
        assert all(c.split()[1].startswith("/agent/my-sid/apis/v1/") for c in agent.calls)
        assert set(agent.auth) == {"Bearer s3cret"}
        assert len(set(agent.worker_ids)) == 1 and agent.worker_ids[0]
    finally:
        await runner.cleanup()


async def test_bad_bodies_get_400_results(agent: FakeAgent, worker_factory) -> None:
    agent.enqueue("bad-json", None, raw=b"{not json")
    agent.enqueue("no-input", {"inputs": {}})
    agent.enqueue("not-object", [1, 2])
    worker_factory("behave.py", worker_env(agent))
    await agent.wait_for(lambda: {"bad-json", "no-input", "not-object"} <= set(agent.acks))
    for rid in ("bad-json", "no-input", "not-object"):
        assert agent.results[rid]["statusCode"] == 400
        assert "error" in json.loads(agent.result_body(rid))
        assert agent.metrics[rid][-1]["status"] == "failed"
    assert "input" in json.loads(agent.result_body("no-input"))["error"]


async def test_handler_exception_and_handler_error(agent: FakeAgent, worker_factory) -> None:
    agent.enqueue("boom", {"input": {"raise": "it broke"}})
    agent.enqueue("teapot", {"input": {"status": 418}})
    agent.enqueue("after", {"input": {"x": 2}})
    worker_factory("behave.py", worker_env(agent))
    await agent.wait_for(lambda: {"boom", "teapot", "after"} <= set(agent.acks))
    assert agent.results["boom"]["statusCode"] == 500
    assert json.loads(agent.result_body("boom")) == {"error": "RuntimeError: it broke"}
    assert agent.results["teapot"]["statusCode"] == 418
    assert json.loads(agent.result_body("teapot")) == {"error": "chosen status",
                                                       "details": {"field": "x"}}
    assert agent.results["after"]["statusCode"] == 200


async def test_bytes_result_is_passed_through(agent: FakeAgent, worker_factory) -> None:
    agent.enqueue("b", {"input": {"bytes": True}})
    worker_factory("behave.py", worker_env(agent))
    await agent.wait_for(lambda: "b" in agent.acks)
    assert agent.result_body("b") == b"\x00raw-bytes"


async def test_ttl_exceeded_is_408_and_not_run(agent: FakeAgent, worker_factory) -> None:
    agent.enqueue("old", {"input": {"x": 1}}, enqueue_at=now_ms() - 5000, ttl_ms=1000)
    w = worker_factory("behave.py", worker_env(agent))
    await agent.wait_for(lambda: "old" in agent.acks)
    assert agent.results["old"]["statusCode"] == 408
    assert [m["status"] for m in agent.metrics["old"]] == ["failed"]
    assert "working" not in w.output


async def test_agent_down_then_back(worker_factory) -> None:
    from aiohttp import web

    from tests.conftest import free_port
    agent = FakeAgent()
    port = free_port()
    agent.url = f"http://127.0.0.1:{port}"
    agent.enqueue("late", {"input": {"x": 3}})
    w = worker_factory("behave.py", worker_env(agent))
    await w.wait_output("unreachable")
    runner = web.AppRunner(agent.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await agent.wait_for(lambda: "late" in agent.acks)
        assert agent.results["late"]["statusCode"] == 200
        await w.wait_output("reachable again")
        assert w.output.count("unreachable") == 1
        assert w.proc.poll() is None
    finally:
        await runner.cleanup()


async def test_unhealthy_agent_with_nothing_running_exits_1(agent: FakeAgent,
                                                             worker_factory) -> None:
    agent.healthy = False
    w = worker_factory("behave.py", worker_env(agent))
    assert await wait_exit(w) == 1
    assert "unhealthy" in w.output


async def test_heartbeat_lists_running_requests(agent: FakeAgent, worker_factory) -> None:
    agent.enqueue("slow", {"input": {"sleep": 1.0}})
    worker_factory("behave.py", worker_env(agent))
    await agent.wait_for(lambda: any("slow" in hb for hb in agent.heartbeats))
    await agent.wait_for(lambda: "slow" in agent.acks)


async def test_heartbeat_cancel_kills_running_sync_job(agent: FakeAgent, worker_factory) -> None:
    agent.enqueue("long", {"input": {"sleep": 30}})
    w = worker_factory("behave.py", worker_env(agent))
    await agent.wait_for(lambda: any("long" in hb for hb in agent.heartbeats))
    agent.cancel = ["long"]
    await agent.wait_for(lambda: "long" in agent.acks)
    assert agent.results["long"]["statusCode"] == 499
    await w.wait_output("starting a replacement")
    assert "SIGKILL" not in w.output and '"level":"ERROR"' not in w.output  # not a crash


async def test_sigterm_drains_running_job_then_exits_0(agent: FakeAgent, worker_factory) -> None:
    agent.enqueue("d", {"input": {"sleep": 1.0}})
    w = worker_factory("behave.py", worker_env(agent))
    await agent.wait_for(lambda: agent.metrics.get("d"))
    w.signal(signal.SIGTERM)
    await agent.wait_for(lambda: "d" in agent.acks)
    assert agent.results["d"]["statusCode"] == 200
    assert await wait_exit(w) == 0


async def test_sigterm_grace_period_fails_overlong_job(agent: FakeAgent, worker_factory) -> None:
    agent.enqueue("long", {"input": {"sleep": 60}})
    w = worker_factory("behave.py", worker_env(agent, SPIRIT_GRACE_PERIOD="0.5"))
    await agent.wait_for(lambda: agent.metrics.get("long"))
    w.signal(signal.SIGTERM)
    await agent.wait_for(lambda: "long" in agent.acks)
    assert agent.results["long"]["statusCode"] == 503
    assert "grace" in agent.results["long"]["message"]
    assert await wait_exit(w) == 0


async def test_auto_transport_goes_on_with_plain_when_the_agent_answers_errors(
        agent: FakeAgent, worker_factory) -> None:  # type: ignore[no-untyped-def]
    """It waits for an agent it cannot reach, not for one that answers: an agent that
    fails its heartbeats (503) still gets polled, on the plain protocol."""
    agent.heartbeat_down = True
    agent.enqueue("r1", {"input": {"x": 1}})
    worker_factory("behave.py", worker_env(agent, SPIRIT_TRANSPORT="auto"))
    await agent.wait_for(lambda: "r1" in agent.acks)
