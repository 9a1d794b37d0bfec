"""Shared fixtures: real servers on 127.0.0.1 and real supervisor processes."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.fake_agent import FakeAgent

ROOT = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "apps"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A port nothing listens on for the whole test: bound here and never listening, so
    connections are refused and no other test's server can take it (as one from
    free_port() can be by the time it is used, under parallel tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def post_json(port: int, body: Any, timeout: float = 30.0) -> tuple[int, Any]:
    """POST ``body`` as JSON to http://127.0.0.1:port/ (a test-mode server): status, JSON answer."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class Worker:
    """A supervisor subprocess; its output is kept for assertions."""

    def __init__(self, app: str, env: dict[str, str], args: list[str], log: Path) -> None:
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **env)
        script = app if os.path.isabs(app) else str(APPS / app)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "spirit_gpu.supervisor", script, *args],
            env=full_env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def child_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True,
                             text=True).stdout
        return [int(x) for x in out.split()]

    async def wait_output(self, text: str, timeout: float = 15.0) -> None:
        await until(lambda: text in self.output, timeout, f"{text!r} in the output",
                    detail=lambda: self.output)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def worker_factory(tmp_path: Path) -> Iterator[object]:
    workers: list[Worker] = []

    def make(app: str, env: dict[str, str] | None = None, args: list[str] | None = None) -> Worker:
        w = Worker(app, env or {}, args or [], tmp_path / f"worker{len(workers)}.log")
        workers.append(w)
        return w

    yield make
    for w in workers:
        w.stop()


@pytest.fixture
async def agent() -> AsyncIterator[FakeAgent]:
    fake = FakeAgent()
    runner = web.AppRunner(fake.app(), access_log=None)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    fake.url = f"http://127.0.0.1:{port}"
    yield fake
    await runner.cleanup()


def worker_env(agent: FakeAgent, **extra: str) -> dict[str, str]:
    env = {"EASE_AGENT_URL": agent.url + agent.prefix, "EASE_HEARTBEAT_INTERVAL": "0.2",
           "SPIRIT_PULL_BACKOFF_MAX": "0.05", "SPIRIT_TRANSPORT": "plain"}
    env.update(extra)
    return env


async def until(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition",
                wake: asyncio.Event | None = None, detail: Callable[[], str] | None = None
                ) -> Any:
    """Await until ``predicate()`` (a function or coroutine function) is truthy; return it.

    The one polling helper: it never blocks the loop (a fake agent or gateway served by
    this loop keeps running), polls every 20 ms or sooner when ``wake`` is set, and fails
    after ``timeout`` s naming ``what`` (and ``detail()``, e.g. the calls seen).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            extra = f": {detail()}" if detail is not None else f" (last: {value!r})"
            raise AssertionError(f"{what} not met within {timeout} s{extra}")
        if wake is None:
            await asyncio.sleep(min(left, 0.02))
            continue
        wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), min(left, 0.2))


async def wait_exit(worker: Worker, timeout: float = 20.0) -> int:
    """The worker's exit code, polling with a deadline (never blocking the loop)."""
    await until(lambda: worker.proc.poll() is not None, timeout)
    return int(worker.proc.returncode)


@pytest.fixture
def store(request: pytest.FixtureRequest) -> Iterator[str]:
    """Which store the gateways of a test use: "memory" unless a module parametrizes
    it (``pytestmark = BOTH_STORES``); "nats" starts a nats-server of its own."""
    kind = getattr(request, "param", "memory")
    if kind == "memory":
        yield "memory"
        return
    from tests.nats_server import TempNats  # it imports this module

    server = TempNats()
    try:
        yield server.url
    finally:
        server.close()
