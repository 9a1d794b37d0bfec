"""What a handler process does once the user's script has called start()."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from spirit_gpu import handlers
from spirit_gpu.child.channel import Channel, exit_process
from spirit_gpu.config import WorkerConfig
from spirit_gpu.env import Env
from spirit_gpu.handlers import BadRequest, Outcome, error_body, prepare_request
from spirit_gpu.log import logger
from spirit_gpu.net.batch_writer import BatchWriter
from spirit_gpu.protocol import ipc
from spirit_gpu.settings import SettingError

# Python 3.12+: a job's task runs its first step at once, in the reader callback;
# a handler that never waits finishes without a loop turn (or Task scheduling).
_EAGER: dict[str, Any] = {"eager_start": True} if sys.version_info >= (3, 12) else {}


def _env(msg: ipc.Run, agent_url: str) -> Env:
    return Env(request_id=msg.request_id, mode=msg.mode, webhook=msg.webhook,
               agent_url=agent_url)


def _join(frames: list[bytes]) -> bytes:
    return frames[0] if len(frames) == 1 else b"".join(frames)


class _Base:
    def __init__(self, channel: Channel, handler: handlers.Handler | None, kind: str,
                 modifier: Callable[[int], Any] | None, check_start: Callable[[], Any] | None,
                 options: dict[str, Any], agent_url: str = "") -> None:
        self.channel = channel
        self.agent_url = agent_url
        self.handler = handler
        self.kind = kind
        self.modifier = modifier
        self.check_start = check_start
        self.options = options
        self.concurrency = 1

    def hello(self) -> None:
        self.concurrency = handlers.call_concurrency_modifier(self.modifier, 1)
        self.channel.send(ipc.Hello(os.getpid(), self.kind, self.concurrency, self.options))

    def ask_concurrency(self, msg: ipc.AskConcurrency) -> None:
        value = handlers.call_concurrency_modifier(self.modifier, msg.current)
        self.channel.send(ipc.Concurrency(value))

    def done(self, msg: ipc.Run, outcome: Outcome, env: Env) -> None:
        self.channel.send(ipc.Done(msg.job, outcome.status_code, outcome.body, outcome.message,
                                   env.recycle_requested))

    def emitter(self, job: int) -> handlers.EmitChunk:
        send = self.channel.send
        return lambda seq, data: send(ipc.Chunk(job, seq, data))


class SyncRuntime(_Base):
    """Sync and generator handlers (and proxy mode): one job at a time, main thread.

    The main thread reads the pipe itself, like a plain echo loop would.
    """

    def serve(self) -> NoReturn:
        self.hello()
        while True:
            for msg in self.channel.read_blocking():
                if isinstance(msg, ipc.Run):
                    self._run(msg)
                elif isinstance(msg, ipc.Stop):
                    exit_process(0)
                elif isinstance(msg, ipc.AskConcurrency):
                    self.ask_concurrency(msg)
                elif isinstance(msg, ipc.CheckStart):
                    ok, error = handlers.call_check_start(self.check_start)
                    self.channel.send(ipc.StartChecked(ok, error))
                # Cancel: a sync handler cannot be interrupted; the supervisor kills us.

    def _run(self, msg: ipc.Run) -> None:
        env = _env(msg, self.agent_url)
        try:
            request = prepare_request(msg.body, msg.request_id)
        except BadRequest as exc:
            self.done(msg, Outcome(400, error_body(str(exc)), str(exc)), env)
            return
        assert self.handler is not None
        emit = self.emitter(msg.job) if self.kind == handlers.GENERATOR else None
        outcome = handlers.run_sync(self.handler, self.kind, request, env, emit)
        self.done(msg, outcome, env)


class AsyncRuntime(_Base):
    """Async and async-generator handlers: many jobs as tasks on one event loop.

    The loop reads the pipe (non-blocking) and writes what a loop turn produced
    in one write.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.cancel_reasons: dict[int, ipc.Cancel] = {}
        self.stopping = False
        self.finished = asyncio.Event()
        self._out: BatchWriter[bytes] | None = None  # made on the runtime's loop
        self._reading = False  # inside the reader callback: it flushes at its end
        self._loop: asyncio.AbstractEventLoop | None = None

    def _queue(self, msg: ipc.Message) -> None:
        out = self._out
        if out is None:
            self.channel.send(msg)
            return
        # nothing else running (and not inside the reader): nothing to batch with
        out.send(self.channel.frame(msg), not self.tasks and not self._reading)

    def _flush(self) -> None:
        if self._out is not None:
            self._out.flush()

    def done(self, msg: ipc.Run, outcome: Outcome, env: Env) -> None:
        self._queue(ipc.Done(msg.job, outcome.status_code, outcome.body, outcome.message,
                             env.recycle_requested))

    def emitter(self, job: int) -> handlers.EmitChunk:
        return lambda seq, data: self._queue(ipc.Chunk(job, seq, data))

    def _readable(self) -> None:
        self._reading = True
        try:
            for msg in self.channel.read_available():
                self._dispatch(msg)
        finally:
            self._reading = False
        self._flush()

    def _dispatch(self, msg: ipc.Message) -> None:
        if isinstance(msg, ipc.Run):
            if not self.stopping:
                assert self._loop is not None
                task = asyncio.Task(self._run(msg), loop=self._loop, **_EAGER)
                if not task.done():  # an eager one may be finished already
                    self.tasks[msg.job] = task
        elif isinstance(msg, ipc.Cancel):
            running = self.tasks.get(msg.job)
            if running is not None:
                self.cancel_reasons[msg.job] = msg
                running.cancel()
        elif isinstance(msg, ipc.AskConcurrency):
            self.ask_concurrency(msg)
        elif isinstance(msg, ipc.Stop):
            self.stopping = True
            if not self.tasks:
                self.finished.set()
        elif isinstance(msg, ipc.CheckStart):
            self.channel.send(ipc.StartChecked(False, "check_start is for proxy mode"))

    async def _run(self, msg: ipc.Run) -> None:
        env = _env(msg, self.agent_url)
        try:
            try:
                request = prepare_request(msg.body, msg.request_id)
            except BadRequest as exc:
                outcome = Outcome(400, error_body(str(exc)), str(exc))
            else:
                assert self.handler is not None
                outcome = await handlers.run_async(self.handler, self.kind, request, env,
                                                   self.emitter(msg.job))
        except asyncio.CancelledError:
            reason = self.cancel_reasons.pop(msg.job, ipc.Cancel(msg.job))
            outcome = Outcome(reason.status_code, error_body(reason.reason), reason.reason)
        finally:
            self.tasks.pop(msg.job, None)
        self.done(msg, outcome, env)
        if self.stopping and not self.tasks:
            self.finished.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        # the pipe is blocking on this side: the sink always writes at once
        self._out = BatchWriter(_join, self.channel.write, max_batch=ipc.FLUSH_EVERY)
        os.set_blocking(self.channel.read_fd, False)
        self._loop.add_reader(self.channel.read_fd, self._readable)
        self.hello()
        await self.finished.wait()
        self._flush()

    def serve(self) -> NoReturn:
        from spirit_gpu.loop import new_event_loop
        loop = new_event_loop()
        asyncio.set_event_loop(loop)
        loop.run_until_complete(self._main())
        exit_process(0)


def serve(channel: Channel, config: dict[str, Any]) -> NoReturn:
    """Serve the supervisor's pipe with the handler from start()'s config."""
    from spirit_gpu.config import start_options

    options = start_options(config)
    cfg = child_config(options)
    channel.set_beat_interval(cfg.ping_interval)  # start()'s, unless a flag or env var says
    logger.set_level(cfg.log_level)  # the same
    check_start = config.get("check_start")
    if options["mode"] == "proxy":
        SyncRuntime(channel, None, "proxy", None, check_start, options, cfg.agent_url).serve()
    # What the script built at import (a model's modules and tensors' wrappers, often
    # millions of objects) lives as long as the process: keep the cyclic GC from
    # scanning it again on every full collection, which would stall each job.
    gc.freeze()
    handler = config["handler"]
    kind = handlers.handler_kind(handler)
    runtime_cls = AsyncRuntime if kind in handlers.ASYNC_KINDS else SyncRuntime
    runtime: SyncRuntime | AsyncRuntime = runtime_cls(
        channel, handler, kind, config.get("concurrency_modifier"), check_start, options,
        cfg.agent_url)
    runtime.serve()


def child_config(options: dict[str, Any]) -> WorkerConfig:
    """The worker config as the supervisor resolves it: its flags reach this process as
    environment variables, so flags > env > start() keys > defaults holds here too.
    A bad start() value is the supervisor's to report: defaults then."""
    try:
        return WorkerConfig.from_sources(options)
    except SettingError:
        return WorkerConfig()
