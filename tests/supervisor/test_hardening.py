"""A handler process that breaks the pipe protocol, forks, or keeps failing: the
supervisor survives it, leaves nothing behind, and says what happened."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from tests.conftest import ROOT, until, wait_exit, worker_env
from tests.fake_agent import FakeAgent

APP = "hostile.py"


def result(agent: FakeAgent, rid: str) -> tuple[int, dict]:
    return agent.results[rid]["statusCode"], json.loads(agent.result_body(rid))


def alive(pid: int) -> bool:
    """Running (a zombie, or a pid gone, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


async def test_a_malformed_frame_kills_only_that_process(agent: FakeAgent,
                                                         worker_factory) -> None:
    agent.enqueue("bad", {"input": {"frame": "garbage"}})
    w = worker_factory(APP, worker_env(agent))
    await agent.wait_for(lambda: "bad" in agent.acks, 20)
    code, body = result(agent, "bad")
    assert code == 500
    assert "sent a malformed frame" in body["error"], body
    assert "exited with code 0" not in body["error"]
    agent.enqueue("after", {"input": {}})  # the supervisor lives on, with a new process
    await agent.wait_for(lambda: "after" in agent.acks, 20)
    assert result(agent, "after")[0] == 200
    assert w.proc.poll() is None


async def test_a_frame_over_the_limit_is_refused_before_it_is_buffered(
        agent: FakeAgent, worker_factory) -> None:
    agent.enqueue("warm", {"input": {}})
    w = worker_factory(APP, worker_env(agent, SPIRIT_MAX_FRAME_MB="1"))
    await agent.wait_for(lambda: "warm" in agent.acks, 20)
    before = rss_kib(w.proc.pid)
    # a 4 GB length prefix, then 32 MiB of its "body"; liveness would end it after
    # 30 s, the limit must end it long before, without buffering the body
    agent.enqueue("huge", {"input": {"frame": "huge"}})
    await agent.wait_for(lambda: "huge" in agent.acks, 15)
    code, body = result(agent, "huge")
    assert code == 500
    assert "sent a frame of 4294967295 bytes, over the 1048576-byte limit" in body["error"], body
    assert rss_kib(w.proc.pid) - before < 16 * 1024  # peak memory: not the 32 MiB sent
    agent.enqueue("after", {"input": {}})
    await agent.wait_for(lambda: "after" in agent.acks, 20)
    assert result(agent, "after")[0] == 200


async def test_a_result_over_the_limit_fails_its_job_not_the_process(
        agent: FakeAgent, worker_factory) -> None:
    agent.enqueue("big", {"input": {"result_mb": 2}})
    agent.enqueue("small", {"input": {}})
    worker_factory(APP, worker_env(agent, SPIRIT_MAX_FRAME_MB="1"))
    await agent.wait_for(lambda: {"big", "small"} <= set(agent.acks), 20)
    code, body = result(agent, "big")
    assert code == 500 and "done too large" in body["error"], body
    small = result(agent, "small")
    assert small[0] == 200
    assert small[1]["pid"]  # same process or not, nothing was killed for it


async def test_a_grandchild_dies_with_its_killed_handler(agent: FakeAgent, worker_factory,
                                                         tmp_path: Path) -> None:
    marker = tmp_path / "grandchild"
    agent.enqueue("forks", {"input": {"fork": str(marker), "sleep": 60}})
    w = worker_factory(APP, worker_env(agent))
    await until(lambda: marker.exists() and marker.read_text(), 20, "the grandchild's pid")
    grandchild = int(marker.read_text())
    assert alive(grandchild)
    child = w.child_pids()[0]
    os.kill(child, 9)
    await agent.wait_for(lambda: "forks" in agent.acks, 20)
    await until(lambda: not alive(grandchild), 10, "the grandchild gone")


async def test_a_grandchild_dies_when_the_supervisor_stops(agent: FakeAgent, worker_factory,
                                                           tmp_path: Path) -> None:
    marker = tmp_path / "grandchild"
    agent.enqueue("forks", {"input": {"fork": str(marker)}})  # returns, leaving it behind
    w = worker_factory(APP, worker_env(agent))
    await agent.wait_for(lambda: "forks" in agent.acks, 20)
    grandchild = int(marker.read_text())
    w.signal(15)
    assert await wait_exit(w) == 0
    await until(lambda: not alive(grandchild), 10, "the grandchild gone")


async def test_a_grandchild_dies_when_the_supervisor_is_sigkilled(agent: FakeAgent,
                                                                   worker_factory,
                                                                   tmp_path: Path) -> None:
    # nobody is left to kill the group: the handler dies by its death signal, and the
    # guard it forked before the script ran ends the rest of its process group
    marker = tmp_path / "grandchild"
    agent.enqueue("forks", {"input": {"fork": str(marker)}})
    w = worker_factory(APP, worker_env(agent))
    await agent.wait_for(lambda: "forks" in agent.acks, 20)
    grandchild = int(marker.read_text())
    w.signal(9)
    await wait_exit(w)
    await until(lambda: not alive(grandchild), 10, "the grandchild gone")


async def test_handler_processes_do_not_see_the_worker_token(agent: FakeAgent,
                                                             worker_factory) -> None:
    agent.enqueue("env", {"input": {}})
    worker_factory(APP, worker_env(agent, SPIRIT_WORKER_TOKEN="s3cret"))
    await agent.wait_for(lambda: "env" in agent.acks, 20)
    code, body = result(agent, "env")
    assert code == 200
    assert body["token"] is None and body["secret_names"] == []
    assert agent.auth and all(a == "Bearer s3cret" for a in agent.auth)  # the supervisor has it


async def test_crashes_in_a_row_make_the_worker_exit_unhealthy(agent: FakeAgent,
                                                               worker_factory) -> None:
    for i in range(3):
        agent.enqueue(f"c{i}", {"input": {"exit": 7}})
    w = worker_factory(APP, worker_env(agent, SPIRIT_MAX_CRASHES="3",
                                       SPIRIT_CRASH_BACKOFF_MAX="0.1"))
    assert await wait_exit(w, 30) == 4
    assert {f"c{i}" for i in range(3)} <= set(agent.acks)
    assert "worker unhealthy" in w.output
    lines = [json.loads(line) for line in w.output.splitlines() if line.startswith("{")]
    crashes = [x for x in lines if x["message"].startswith("handler process")
               and "exited with code 7;" in x["message"]]
    assert len(crashes) == 3  # each names the request it took down
    assert {c["requestID"] for c in crashes} == {"c0", "c1", "c2"}
    agent.enqueue("later", {"input": {}})
    assert "later" not in agent.results  # nobody took it: a platform replaces this worker


async def test_cuda_out_of_memory_counts_toward_unhealthy(agent: FakeAgent,
                                                          worker_factory) -> None:
    agent.enqueue("ok", {"input": {}})
    for i in range(2):
        agent.enqueue(f"oom{i}", {"input": {"oom": True}})
    w = worker_factory(APP, worker_env(agent, SPIRIT_MAX_CRASHES="2"))
    assert await wait_exit(w, 30) == 4
    assert result(agent, "ok")[0] == 200
    for i in range(2):
        code, body = result(agent, f"oom{i}")
        assert code == 500 and "CUDA out of memory" in body["error"]
    assert "CUDA out of memory" in w.output


async def test_a_request_over_the_frame_limit_fails_413_before_the_pipe(
        agent: FakeAgent, worker_factory) -> None:
    agent.enqueue("big", {"input": {"pad": "x" * (2 << 20)}})
    agent.enqueue("small", {"input": {}})
    w = worker_factory(APP, worker_env(agent, SPIRIT_MAX_FRAME_MB="1"))
    await agent.wait_for(lambda: {"big", "small"} <= set(agent.acks), 20)
    code, body = result(agent, "big")
    assert code == 413 and "request too large" in body["error"], body
    assert result(agent, "small")[0] == 200
    assert "exited" not in w.output and "crash" not in w.output


GUARD_AFTER_ITS_HANDLER = """
import os, sys, time
from spirit_gpu.child.__main__ import _guard
handler = os.getpid()
if os.fork() == 0:  # the guard, starting only once its handler is already gone
    while os.getppid() == handler:
        time.sleep(0.01)
    open(sys.argv[1], "w").write(str(os.getpid()))
    _guard(handler, ())
os._exit(0)
"""


async def test_a_guard_whose_handler_died_before_it_started_does_not_linger(
        tmp_path: Path) -> None:
    marker = tmp_path / "guard"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", GUARD_AFTER_ITS_HANDLER, str(marker),
        env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True)
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    await until(lambda: marker.exists() and marker.read_text() != "", 10, "the guard started")
    guard = int(marker.read_text())
    try:
        await until(lambda: not alive(guard), 10, "the guard gone")
    finally:
        if alive(guard):
            os.kill(guard, signal.SIGKILL)
