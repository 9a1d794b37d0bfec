"""Handler processes: kinds, concurrency, crashes, liveness, timeouts, recycling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from spirit_gpu import handlers
from tests.conftest import APPS, ROOT, until, wait_exit, worker_env
from tests.fake_agent import FakeAgent


def result(agent: FakeAgent, rid: str) -> tuple[int, object]:
    return agent.results[rid]["statusCode"], json.loads(agent.result_body(rid))


@pytest.mark.parametrize(("kind", "inp", "expected"), [
    ("sync", {"x": 5}, {"kind": "sync", "x": 5}),
    ("generator", {"n": 3}, [{"i": 0}, {"i": 1}, {"i": 2}]),
    ("async_generator", {"n": 4}, [0, 1, 2, 3]),
])
async def test_handler_kinds(agent: FakeAgent, worker_factory, kind: str, inp: dict,
                             expected: object) -> None:
    agent.enqueue("k", {"input": inp})
    worker_factory("kinds.py", worker_env(agent, APP_KIND=kind))
    await agent.wait_for(lambda: "k" in agent.acks)
    assert result(agent, "k") == (200, expected)


async def test_async_handler_multiplexes_jobs_in_one_process(agent: FakeAgent,
                                                             worker_factory) -> None:
    for i in range(4):
        agent.enqueue(f"a{i}", {"input": {"sleep": 1.0}})
    worker_factory("kinds.py", worker_env(agent, APP_KIND="async", APP_CONCURRENCY="4"))
    started = time.monotonic()
    await agent.wait_for(lambda: len(agent.acks) == 4)
    bodies = [result(agent, f"a{i}")[1] for i in range(4)]
    assert len({b["pid"] for b in bodies}) == 1  # type: ignore[index]
    assert {b["id"] for b in bodies} == {f"a{i}" for i in range(4)}  # type: ignore[index]
    assert time.monotonic() - started < 3.5  # four 1 s jobs overlapped


async def test_sync_concurrency_uses_distinct_overlapping_processes(agent: FakeAgent,
                                                                    worker_factory) -> None:
    for i in range(2):
        agent.enqueue(f"c{i}", {"input": {"sleep": 0.6}})
    worker_factory("behave.py", worker_env(agent, APP_CONCURRENCY="2"))
    await agent.wait_for(lambda: len(agent.acks) == 2, 30)
    a, b = (result(agent, f"c{i}")[1] for i in range(2))
    assert a["pid"] != b["pid"]  # type: ignore[index]
    assert a["start"] < b["end"] and b["start"] < a["end"]  # type: ignore[index]


async def test_killed_child_fails_only_its_job_and_is_replaced(agent: FakeAgent,
                                                               worker_factory) -> None:
    agent.enqueue("ok1", {"input": {"x": 1}})
    worker_factory("behave.py", worker_env(agent))
    await agent.wait_for(lambda: "ok1" in agent.acks)
    first_pid = result(agent, "ok1")[1]["pid"]  # type: ignore[index]
    agent.enqueue("dies", {"input": {"kill": True}})
    agent.enqueue("ok2", {"input": {"x": 2}})
    await agent.wait_for(lambda: {"dies", "ok2"} <= set(agent.acks))
    code, body = result(agent, "dies")
    assert code == 500
    assert "SIGKILL" in body["error"]  # type: ignore[index]
    assert "SIGKILL" in agent.metrics["dies"][-1]["message"]
    code, body = result(agent, "ok2")
    assert code == 200 and body["pid"] != first_pid  # type: ignore[index]


async def test_a_child_whose_pipe_closed_gets_no_new_job(agent: FakeAgent, worker_factory,
                                                          tmp_path) -> None:
    # Between closing its pipe and being reaped, a dying process (one freeing GPU
    # memory, say) must not be handed work: the job waits for the replacement.
    marker = tmp_path / "vanished"
    agent.enqueue("ok1", {"input": {"x": 1}})
    worker_factory("behave.py", dict(worker_env(agent), APP_VANISHED_FILE=str(marker)))
    await agent.wait_for(lambda: "ok1" in agent.acks)
    first_pid = result(agent, "ok1")[1]["pid"]  # type: ignore[index]
    os.kill(first_pid, signal.SIGUSR1)
    await agent.wait_for(marker.exists)
    agent.enqueue("ok2", {"input": {"x": 2}})
    await agent.wait_for(lambda: "ok2" in agent.acks)
    code, body = result(agent, "ok2")
    assert code == 200, body
    assert body["pid"] != first_pid  # type: ignore[index]


async def test_exit_code_is_named_and_crash_loop_backs_off(agent: FakeAgent,
                                                           worker_factory) -> None:
    for i in range(2):  # the second crash in a row backs off
        agent.enqueue(f"e{i}", {"input": {"exit": 7}})
    agent.enqueue("fine", {"input": {"x": 1}})
    # real os._exit crashes; the backoff's delays are tests/supervisor/test_pool.py's
    w = worker_factory("behave.py", worker_env(agent, SPIRIT_CRASH_BACKOFF_MAX="0.2"))
    await agent.wait_for(lambda: "fine" in agent.acks, 30)
    for i in range(2):
        code, body = result(agent, f"e{i}")
        assert code == 500 and "exited with code 7" in body["error"]  # type: ignore[index]
    assert "backing off" in w.output
    assert result(agent, "fine")[0] == 200


async def test_import_error_exits_nonzero_and_says_so_once(agent: FakeAgent,
                                                           worker_factory) -> None:
    w = worker_factory("broken_import.py", worker_env(agent))
    assert await wait_exit(w) == 3
    assert w.output.count("No module named 'this_module_does_not_exist'") == 1
    assert "no handler process could start" in w.output


async def test_script_without_start_is_reported(agent: FakeAgent, worker_factory) -> None:
    w = worker_factory("no_start.py", worker_env(agent))
    assert await wait_exit(w) == 3
    assert "without calling spirit_gpu.start()" in w.output


async def test_wedged_child_is_killed_when_its_beats_stop(agent: FakeAgent, worker_factory) -> None:
    agent.enqueue("wedge", {"input": {"wedge": True}})
    agent.enqueue("next", {"input": {"x": 1}})
    worker_factory("behave.py", worker_env(agent, SPIRIT_PING_INTERVAL="0.2",
                                           SPIRIT_PING_TIMEOUT="1.0"))
    await agent.wait_for(lambda: {"wedge", "next"} <= set(agent.acks), 30)
    code, body = result(agent, "wedge")
    assert code == 500 and "unresponsive" in body["error"]  # type: ignore[index]
    assert result(agent, "next")[0] == 200


async def test_sync_job_timeout_kills_child_with_408(agent: FakeAgent, worker_factory) -> None:
    agent.enqueue("slow", {"input": {"sleep": 30}})
    agent.enqueue("next", {"input": {"x": 1}})
    w = worker_factory("behave.py", worker_env(agent, SPIRIT_JOB_TIMEOUT="0.5"))
    await agent.wait_for(lambda: {"slow", "next"} <= set(agent.acks), 30)
    code, body = result(agent, "slow")
    assert code == 408 and "timeout" in body["error"]  # type: ignore[index]
    assert result(agent, "next")[0] == 200
    # the supervisor killed it on purpose: not an out-of-memory error, not a crash
    assert "stopped (request timeout" in w.output
    assert "SIGKILL" not in w.output and '"level":"ERROR"' not in w.output
    assert timeout_warned(w.output, "slow")


@pytest.mark.parametrize("how", ["flag", "env"])
async def test_in_process_runs_handlers_in_the_worker_and_times_them_out(
        agent: FakeAgent, worker_factory, how: str) -> None:
    agent.enqueue("quick", {"input": {}})
    agent.enqueue("slow", {"input": {"sleep": 30}})
    env = worker_env(agent, APP_KIND="async", SPIRIT_JOB_TIMEOUT="0.5")
    if how == "env":
        env["SPIRIT_IN_PROCESS"] = "1"
    w = worker_factory("kinds.py", env, ["--in-process"] if how == "flag" else [])
    await agent.wait_for(lambda: {"quick", "slow"} <= set(agent.acks), 30)
    assert result(agent, "quick")[1]["pid"] == w.proc.pid  # type: ignore[index]
    assert result(agent, "slow")[0] == 408
    assert timeout_warned(w.output, "slow")
    assert "handlers run inside the worker process" in w.output


def timeout_warned(output: str, request_id: str) -> bool:
    """The worker's log has a warning that ``request_id`` ran past the job timeout."""
    return any('"level":"WARNING"' in line and "job timeout" in line
               and f'"requestID":"{request_id}"' in line for line in output.splitlines())


async def test_async_job_timeout_cancels_task_and_keeps_process(agent: FakeAgent,
                                                                worker_factory) -> None:
    agent.enqueue("slow", {"input": {"sleep": 30}})
    agent.enqueue("quick", {"input": {}})
    w = worker_factory("kinds.py", worker_env(agent, APP_KIND="async", APP_CONCURRENCY="2",
                                              SPIRIT_JOB_TIMEOUT="0.5"))
    await agent.wait_for(lambda: {"slow", "quick"} <= set(agent.acks), 30)
    assert result(agent, "slow")[0] == 408
    assert timeout_warned(w.output, "slow")
    agent.enqueue("after", {"input": {}})
    await agent.wait_for(lambda: "after" in agent.acks)
    assert result(agent, "after")[1]["pid"] == result(agent, "quick")[1]["pid"]  # type: ignore[index]


async def test_recycle_after_n_jobs_and_on_request(agent: FakeAgent, worker_factory) -> None:
    for i in range(3):
        agent.enqueue(f"n{i}", {"input": {"x": i}})
    w = worker_factory("behave.py", worker_env(agent, SPIRIT_MAX_JOBS_PER_CHILD="2"))
    await agent.wait_for(lambda: len(agent.acks) == 3, 30)
    pids = [result(agent, f"n{i}")[1]["pid"] for i in range(3)]  # type: ignore[index]
    assert pids[0] == pids[1] != pids[2]
    agent.enqueue("ask", {"input": {"recycle": True}})
    agent.enqueue("after", {"input": {}})
    await agent.wait_for(lambda: {"ask", "after"} <= set(agent.acks), 30)
    assert result(agent, "ask")[1]["pid"] != result(agent, "after")[1]["pid"]  # type: ignore[index]
    assert "recycling handler process" in w.output
    assert "crash" not in w.output


async def test_sigkill_of_supervisor_leaves_no_child(agent: FakeAgent, worker_factory) -> None:
    agent.enqueue("busy", {"input": {"sleep": 30}})
    w = worker_factory("behave.py", worker_env(agent))
    await agent.wait_for(lambda: agent.metrics.get("busy"))
    children = w.child_pids()
    assert children
    w.signal(signal.SIGKILL)
    w.wait(10)

    def all_gone() -> bool:
        return not any(os.path.exists(f"/proc/{pid}") and
                       "Z" not in open(f"/proc/{pid}/stat").read().split()[2]
                       for pid in children)
    await until(all_gone, 10)


async def test_bad_concurrency_modifier_means_one(agent: FakeAgent, worker_factory) -> None:
    agent.enqueue("x", {"input": {"x": 1}})
    w = worker_factory("behave.py", worker_env(agent, APP_BAD_MODIFIER="1"))
    await agent.wait_for(lambda: "x" in agent.acks)
    assert "concurrency_modifier raised ValueError: boom; using 1" in w.output


def test_a_modifier_error_is_said_once_not_every_second(monkeypatch, capsys) -> None:
    # the modifier is asked every second: the same error is one line a minute
    monkeypatch.setattr(handlers, "_modifier_complaint", handlers._Complaint(every=60.0))

    def bad(current: int) -> int:
        raise ValueError("boom")
    for _ in range(5):
        assert handlers.call_concurrency_modifier(bad, 3) == 1
    assert handlers.call_concurrency_modifier(lambda current: "three", 3) == 1
    out = capsys.readouterr().out
    assert out.count("concurrency_modifier raised ValueError: boom; using 1") == 1
    assert out.count("concurrency_modifier returned 'three'") == 1  # a new error: said


def test_python_main_py_hands_over_to_the_supervisor(tmp_path) -> None:
    from tests.conftest import free_port
    port = free_port()
    env = dict(os.environ, EASE_TEST_MODE="true", EASE_TEST_PORT=str(port),
               PYTHONUNBUFFERED="1")
    log = tmp_path / "out.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(APPS / "behave.py")], env=env,
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        import urllib.request
        deadline = time.monotonic() + 20
        while True:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/",
                                             data=b'{"input": {"x": 4}}', method="POST")
                with urllib.request.urlopen(req, timeout=5) as resp:
                    body = json.loads(resp.read())
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        assert body["y"] == 8
        assert body["pid"] != proc.pid  # the handler ran in a child of the supervisor
        text = log.read_text()
        assert text.count("handing over") == 1
        cmdline = open(f"/proc/{proc.pid}/cmdline").read()
        assert "spirit_gpu.supervisor" in cmdline  # same pid, now the supervisor
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_supervisor_flags_after_the_script_and_passthrough_args() -> None:
    from spirit_gpu.supervisor.__main__ import parse
    ns, rest = parse(["main.py", "--job-timeout", "0.5", "--model", "x", "--", "--max-children",
                      "9"])
    assert ns.script == "main.py" and ns.job_timeout == "0.5" and ns.max_children is None
    assert rest == ["--model", "x", "--max-children", "9"]
    ns, rest = parse(["--max-children", "2", "main.py"])
    assert (ns.script, ns.max_children, rest) == ("main.py", "2", [])


@pytest.mark.parametrize(("env", "debug"), [({}, True), ({"EASE_LOG_LEVEL": "INFO"}, False)])
async def test_start_log_level_sets_both_processes_unless_the_environment_does(
        agent: FakeAgent, worker_factory, env: dict[str, str], debug: bool) -> None:
    agent.enqueue("l", {"input": {}})
    w = worker_factory("log_level.py", worker_env(agent, **env))
    await agent.wait_for(lambda: "l" in agent.acks)
    await until(lambda: "ready (sync handler)" in w.output or not debug, 10, "the ready line")
    assert ("a debug line from the handler" in w.output) is debug, w.output  # the handler's
    assert ("ready (sync handler)" in w.output) is debug, w.output  # the supervisor's
