"""Fakes for unit tests of the pool: handler processes without processes, and a loop
whose clock jumps over idle time (trio's autojump clock, for asyncio).

Modelled on uvicorn's protocol tests against mock transports: the Pool under test is
the real one; only what it drives (the child process and the passing of time) is fake.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from spirit_gpu.protocol import ipc

T = TypeVar("T")


class _JumpSelector(selectors.DefaultSelector):
    """When the loop would sleep waiting for a timer, advance its clock instead."""

    loop: JumpLoop | None = None

    def select(self, timeout: float | None = None) -> list[Any]:
        events = super().select(0)
        if events or timeout == 0 or self.loop is None:
            return events
        if timeout is None:  # nothing scheduled: really wait (for a thread, say)
            return super().select(0.01)
        self.loop.now += timeout
        return []


class JumpLoop(asyncio.SelectorEventLoop):
    """Time passes only when every task waits for a timer: then it jumps to the next one.

    A test runs in no wall-clock time, however long the timeouts it exercises."""

    def __init__(self) -> None:
        selector = _JumpSelector()
        super().__init__(selector)
        selector.loop = self
        self.now = 1000.0

    def time(self) -> float:
        return self.now


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    loop = JumpLoop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


class FakeChild:
    """A handler process as the Pool sees it (``ChildProcess``'s interface)."""

    registry: list[FakeChild]

    def __init__(self, cid: int, on_message: Callable[[Any, ipc.Message], None],
                 registry: list[FakeChild], behaviour: Behaviour) -> None:
        self.cid = cid
        self.on_message = on_message
        self.behaviour = behaviour
        self.state = "starting"
        self.pid = 10_000 + cid
        self.jobs: dict[int, Any] = {}
        self.jobs_done = 0
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.last_seen = self.idle_since = self.started_at = loop.time()
        self.fatal = ""
        self.was_ready = False
        self.kill_reason = ""
        self.killed_on_purpose = False
        self.protocol_error = ""
        self.eof = asyncio.Event()
        self.sent: list[ipc.Message] = []
        self.spawned_at = 0.0
        self.beat_interval = 0.0
        self.exit_code: asyncio.Future[int] = loop.create_future()
        registry.append(self)

    # --- what the pool calls ----------------------------------------------------
    async def spawn(self, script: str, args: list[str], env: dict[str, str],
                    beat_interval: float, max_frame: int = ipc.DEFAULT_MAX_FRAME) -> None:
        self.spawned_at = self._loop.time()
        self.beat_interval = beat_interval
        if self.behaviour.auto_hello:
            self._loop.call_soon(self.hello)
        if not self.behaviour.silent:
            self._loop.call_later(beat_interval, self._beat, 1)

    def send(self, msg: ipc.Message, alone: bool = False) -> None:
        self.sent.append(msg)
        if isinstance(msg, ipc.Stop):
            self._loop.call_soon(self.exit, 0)
        elif isinstance(msg, ipc.AskConcurrency) and not self.behaviour.silent:
            value = self.behaviour.concurrency(msg.current)
            self._loop.call_soon(self.tell, ipc.Concurrency(value))
        elif isinstance(msg, ipc.Run) and self.behaviour.job_seconds is not None:
            self._loop.call_later(self.behaviour.job_seconds, self.done, msg.job)

    def kill(self, reason: str = "", on_purpose: bool = False) -> None:
        if reason and not self.kill_reason:
            self.kill_reason = reason
            self.killed_on_purpose = on_purpose
        self._loop.call_soon(self.exit, -9)

    def stop(self) -> None:
        if self.state != "dead":
            self.state = "stopping"
            self.send(ipc.Stop())

    async def wait(self) -> int:
        return await self.exit_code

    def close(self) -> None:
        pass

    # --- what the test (or the fake's behaviour) does ---------------------------------
    def tell(self, msg: ipc.Message) -> None:
        if not self.exit_code.done():
            self.on_message(self, msg)

    def hello(self, kind: str = "", concurrency: int = 1,
              options: dict[str, Any] | None = None) -> None:
        b = self.behaviour
        self.tell(ipc.Hello(self.pid, kind or b.kind, concurrency,
                            options if options is not None else b.options))

    def done(self, job: int, status: int = 200, recycle: bool = False) -> None:
        self.tell(ipc.Done(job, status, b'{"ok": true}', "", recycle))

    def _beat(self, seq: int) -> None:
        """The beat thread of a live process."""
        if not self.exit_code.done() and not self.behaviour.silent:
            self.tell(ipc.Beat(seq))
            self._loop.call_later(self.beat_interval, self._beat, seq + 1)

    def exit(self, code: int) -> None:
        if not self.exit_code.done():
            self.eof.set()
            self.exit_code.set_result(code)

    def runs(self) -> list[ipc.Run]:
        return [m for m in self.sent if isinstance(m, ipc.Run)]


class Behaviour:
    """How fake children act unless a test drives them by hand."""

    def __init__(self, kind: str = "sync", options: dict[str, Any] | None = None,
                 auto_hello: bool = True, job_seconds: float | None = None,
                 concurrency: Callable[[int], int] = lambda current: current,
                 silent: bool = False) -> None:
        self.kind = kind
        self.options = options or {"mode": "handler"}
        self.auto_hello = auto_hello
        self.job_seconds = job_seconds
        self.concurrency = concurrency
        self.silent = silent  # answers nothing: a wedged process


def factory(registry: list[FakeChild], behaviour: Behaviour
            ) -> Callable[[int, Callable[[Any, ipc.Message], None]], Any]:
    def make(cid: int, on_message: Callable[[Any, ipc.Message], None]) -> FakeChild:
        return FakeChild(cid, on_message, registry, behaviour)
    return make
