"""The handler process on its own: a real ``python -m spirit_gpu.child`` on real pipes,
with this test acting as the supervisor (no supervisor code involved)."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spirit_gpu.protocol import ipc
from tests.conftest import APPS, ROOT

APP = Path(__file__).parent / "app.py"


class Child:
    def __init__(self, script: Path, env: dict[str, str]) -> None:
        down_r, self.down_w = os.pipe()
        self.up_r, up_w = os.pipe()
        full = dict(os.environ, SPIRIT_CHILD_FDS=f"{down_r},{up_w}", SPIRIT_BEAT_INTERVAL="30",
                    **env)
        self.proc = subprocess.Popen([sys.executable, "-m", "spirit_gpu.child", str(script)],
                                     pass_fds=(down_r, up_w), env=full, cwd=ROOT)
        os.close(down_r)
        os.close(up_w)

    def send(self, msg: ipc.Message) -> None:
        ipc.write_all(self.down_w, ipc.encode(msg))

    def receive(self, timeout: float = 20.0, skip_beats: bool = True) -> ipc.Message:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, "no message from the handler process in time"
            ready, _, _ = select.select([self.up_r], [], [], left)
            if not ready:
                continue
            msg = ipc.read_message(self.up_r)
            assert msg is not None, f"pipe closed (exit {self.proc.wait(5)})"
            if skip_beats and isinstance(msg, ipc.Beat):
                continue
            return msg

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        os.close(self.down_w)
        os.close(self.up_r)


@pytest.fixture
def spawn() -> Iterator[object]:
    children: list[Child] = []

    def make(env: dict[str, str] | None = None, script: Path = APP) -> Child:
        child = Child(script, env or {})
        children.append(child)
        return child
    yield make
    for child in children:
        child.close()


def test_hello_run_done_stop(spawn) -> None:
    child = spawn({"EASE_AGENT_URL": "http://agent.test:1/agent/s"})
    hello = child.receive()
    assert isinstance(hello, ipc.Hello) and hello.kind == "sync"
    assert hello.pid == child.proc.pid and hello.options["mode"] == "handler"
    child.send(ipc.Run(1, "r1", "sync", "", b'{"input": {}}'))
    done = child.receive()
    assert isinstance(done, ipc.Done) and done.status_code == 200
    import json
    body = json.loads(done.body)
    # Env reads the worker config (flags reach a handler process as env vars)
    assert body["agent_url"] == "http://agent.test:1/agent/s" and body["request_id"] == "r1"
    # what the script built at import is out of the cyclic GC's way during jobs
    assert body["frozen"] > 1000
    child.send(ipc.Run(2, "r2", "sync", "", b"not json"))
    bad = child.receive()
    assert isinstance(bad, ipc.Done) and bad.status_code == 400
    child.send(ipc.Stop())
    assert child.proc.wait(10) == 0


def test_start_keys_set_the_beat_interval_unless_the_supervisor_overrides(spawn) -> None:
    child = spawn({"APP_PING": "0.05"})  # launched with a 30 s beat; start() says 0.05 s
    assert isinstance(child.receive(), ipc.Hello)
    beats = [child.receive(5.0, skip_beats=False) for _ in range(3)]
    assert all(isinstance(b, ipc.Beat) for b in beats)
    overridden = spawn({"APP_PING": "0.05", "SPIRIT_PING_INTERVAL": "30"})
    assert isinstance(overridden.receive(), ipc.Hello)
    overridden.send(ipc.AskConcurrency(1))  # anything but a beat comes back first
    assert isinstance(overridden.receive(5.0, skip_beats=False), ipc.Concurrency)


def test_async_child_cancels_a_job_with_the_given_status(spawn) -> None:
    child = spawn({"APP_ASYNC": "1"})
    hello = child.receive()
    assert isinstance(hello, ipc.Hello) and hello.kind == "async"
    child.send(ipc.Run(1, "slow", "sync", "", b'{"input": {"sleep": 60}}'))
    child.send(ipc.Run(2, "quick", "sync", "", b'{"input": {}}'))
    quick = child.receive()
    assert isinstance(quick, ipc.Done) and quick.job == 2
    child.send(ipc.Cancel(1, 408, "request timeout"))
    cancelled = child.receive()
    assert isinstance(cancelled, ipc.Done) and (cancelled.job, cancelled.status_code) == (1, 408)
    assert b"request timeout" in cancelled.body


def test_import_error_is_fatal_with_the_traceback(spawn) -> None:
    child = spawn(script=APPS / "broken_import.py")
    fatal = child.receive()
    assert isinstance(fatal, ipc.Fatal) and "this_module_does_not_exist" in fatal.message
    assert child.proc.wait(10) == 3


def test_the_process_exits_when_the_supervisor_is_gone(spawn) -> None:
    child = spawn()
    assert isinstance(child.receive(), ipc.Hello)
    os.close(child.down_w)  # the supervisor's end of the pipe closes
    child.down_w = os.open(os.devnull, os.O_WRONLY)  # for close()
    assert child.proc.wait(10) == 0
