"""The pool of handler processes: scaling, dispatch, crashes, timeouts, recycling."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from spirit_gpu.config import WorkerConfig, secret_env_names
from spirit_gpu.handlers import ASYNC_KINDS, Outcome, error_body
from spirit_gpu.log import logger
from spirit_gpu.protocol import ipc
from spirit_gpu.retry import RetryPolicy
from spirit_gpu.settings import SettingError
from spirit_gpu.supervisor.child_process import ChildProcess, describe_exit
from spirit_gpu.supervisor.jobs import Job

ChunkSink = Callable[[int, bytes], None]
# start() keys (the first Hello's options) -> the worker's final config
Resolve = Callable[[Mapping[str, object]], WorkerConfig]
ChildFactory = Callable[[int, Callable[[ChildProcess, ipc.Message], None]], ChildProcess]


# a job failing with one of these leaves the GPU in a state only a new machine fixes
# as reliably: it counts like a crash toward max_crashes
OUT_OF_MEMORY_MARKS = ("CUDA out of memory", "OutOfMemoryError")


def out_of_memory(message: str) -> bool:
    return any(mark in message for mark in OUT_OF_MEMORY_MARKS)


def crash_retry(cfg: WorkerConfig) -> RetryPolicy:
    """Restart delays of a crash-looping handler: the first crash restarts at once,
    then 0.5 s, doubling up to ``crash_backoff_max``."""
    return RetryPolicy(first=0.5, factor=2.0, max_delay=cfg.crash_backoff_max)


class StartupFailed(Exception):
    """No handler process ever became ready (e.g. the script does not import)."""


class _Run:
    __slots__ = ("job_id", "job", "future", "on_chunk", "child", "timer", "reason")

    def __init__(self, job_id: int, job: Job, on_chunk: ChunkSink | None,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.job_id = job_id
        self.job = job
        self.future: asyncio.Future[Outcome] = loop.create_future()
        self.on_chunk = on_chunk
        self.child: ChildProcess | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.reason: tuple[int, str] | None = None  # why we killed its process, if we did

    def finish(self, outcome: Outcome) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if not self.future.done():
            self.future.set_result(outcome)


def _failed(code: int, message: str) -> Outcome:
    return Outcome(code, error_body(message), message)


class Pool:
    """``cfg`` is what the first process starts under; once it says hello, ``resolve``
    (given its start() keys) builds the final config, once. ``new_child`` and the
    loop's clock are what unit tests replace."""

    def __init__(self, cfg: WorkerConfig, script: str, args: list[str],
                 resolve: Resolve | None = None, new_child: ChildFactory = ChildProcess,
                 child_env: Mapping[str, str] | None = None) -> None:
        self.cfg = cfg
        self.script = script
        self.args = args
        self._resolve = resolve
        self._new_child = new_child
        self.kind: str | None = None
        self._async = False
        self.options: dict[str, object] = {}
        self.allowed = 1
        self.children: dict[int, ChildProcess] = {}
        self.runs: dict[int, _Run] = {}
        self.pending: deque[_Run] = deque()
        self.ever_ready = False
        self.ready = asyncio.Event()
        # cached: asyncio.get_running_loop() costs a getpid() syscall on 3.11
        self._loop = asyncio.get_running_loop()
        self._clock = self._loop.time
        self.startup_error: asyncio.Future[str] = self._loop.create_future()
        self.changed = asyncio.Event()  # capacity may have changed
        self.listeners: list[Callable[[], None]] = []
        self.closing = False
        self.crash_streak = 0
        # why this worker should be replaced ("" while healthy): max_crashes crashes
        # (or CUDA out-of-memory errors) in a row; the job loop stops pulling then
        self.unhealthy = ""
        self._next_spawn = 0.0
        self._spawn_timer: asyncio.TimerHandle | None = None
        self._ids = itertools.count(1)
        self._job_ids = itertools.count(1)
        self._fatal_seen: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._check: asyncio.Future[tuple[bool, str]] | None = None
        self._watchdog_task: asyncio.Task[None] | None = None
        # the worker token (and any other secret) stays with the supervisor: handler
        # code never needs it, and a handler's dependency must not be able to read it
        hidden = secret_env_names() | {"SPIRIT_SUPERVISED"}
        self._env = {k: v for k, v in os.environ.items() if k not in hidden}
        self._env.update(child_env or {})
        self._hurried = False

    def _notify(self) -> None:
        self.changed.set()
        for listener in self.listeners:
            listener()

    # ---- capacity -------------------------------------------------------------

    @property
    def is_async(self) -> bool:
        return self._async

    @property
    def slots(self) -> int:
        if not self.ever_ready or self.closing or self.unhealthy:
            return 0
        if self.is_async:
            return self.allowed
        return max(1, min(self.allowed, self.cfg.max_children))


    def running_request_ids(self) -> list[str]:
        return [r.job.request_id for r in self.runs.values()]

    # ---- life -------------------------------------------------------------------

    async def start(self) -> None:
        self._spawn_now()
        self._watchdog_task = asyncio.ensure_future(self._watchdog())

    async def wait_ready(self) -> None:
        """Return once a child is ready; raise StartupFailed if none can start."""
        ready: asyncio.Future[Any] = asyncio.ensure_future(self.ready.wait())
        failed: asyncio.Future[Any] = self.startup_error
        try:
            await asyncio.wait([ready, failed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if not self.ready.is_set():
            raise StartupFailed(self.startup_error.result())

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _spawn_now(self) -> None:
        child = self._new_child(next(self._ids), self._on_message)
        self.children[child.cid] = child
        self._background(self._run_child(child))

    async def _run_child(self, child: ChildProcess) -> None:
        try:
            await child.spawn(self.script, self.args, self._env, self.cfg.ping_interval,
                              self.cfg.max_frame)
        except OSError as exc:
            logger.error(f"could not start a handler process: {exc}")
            child.state = "dead"
            self.children.pop(child.cid, None)
            if not self.ever_ready and not self.startup_error.done():
                self.startup_error.set_result(f"could not start a handler process: {exc}")
            return
        code = await child.wait()
        self._on_exit(child, code)

    # ---- messages from children -------------------------------------------------

    def _on_message(self, child: ChildProcess, msg: ipc.Message) -> None:
        child.last_seen = now = self._clock()
        if isinstance(msg, ipc.Done):
            self._on_done(child, msg, now)
        elif isinstance(msg, ipc.Chunk):
            run = child.jobs.get(msg.job)
            if run is not None and run.on_chunk is not None:
                run.on_chunk(msg.seq, msg.data)
        elif isinstance(msg, ipc.Hello):
            self._on_hello(child, msg)
        elif isinstance(msg, ipc.Concurrency):
            if msg.value != self.allowed:
                logger.debug(f"concurrency_modifier: allowed concurrency {self.allowed} -> "
                             f"{msg.value}")
                self.allowed = msg.value
                self._pump()
                self._notify()
        elif isinstance(msg, ipc.StartChecked):
            if self._check is not None and not self._check.done():
                self._check.set_result((msg.ok, msg.error))
        elif isinstance(msg, ipc.Fatal):
            child.fatal = msg.message
            # before any child was ready, the startup failure reports it (once)
            if self.ever_ready and msg.message not in self._fatal_seen:
                self._fatal_seen.add(msg.message)
                logger.error(f"handler process {child.pid} cannot serve: {msg.message}")

    def _on_hello(self, child: ChildProcess, msg: ipc.Hello) -> None:
        if child.state != "starting":  # e.g. lost: its pipe closed right after Hello
            return
        child.state = "ready"
        child.was_ready = True
        child.idle_since = self._clock()
        if self.kind is None:
            self.kind = msg.kind
            self._async = msg.kind in ASYNC_KINDS
            self.options = dict(msg.options)
            self.allowed = msg.concurrency
            if self._resolve is not None:  # start() keys, under env vars and flags
                try:
                    self.cfg = self._resolve(self.options)
                except SettingError as exc:
                    if not self.startup_error.done():
                        self.startup_error.set_result(str(exc))
                    return
                logger.set_level(self.cfg.log_level)  # start()'s "log_level" may set it
        self.ever_ready = True
        logger.debug(f"handler process {msg.pid} ready ({msg.kind} handler)")
        self.ready.set()
        self._pump()
        self._scale()
        self._notify()

    def _on_done(self, child: ChildProcess, msg: ipc.Done, now: float) -> None:
        run = child.jobs.pop(msg.job, None)
        child.jobs_done += 1
        child.idle_since = now
        if msg.status_code >= 500 and out_of_memory(msg.message):
            self._count_failure(f"CUDA out of memory: {msg.message}")
        else:
            self.crash_streak = 0
        if run is not None:
            self.runs.pop(run.job_id, None)
            if run.reason is not None:  # e.g. cancelled for timeout: report why
                msg = ipc.Done(msg.job, run.reason[0], error_body(run.reason[1]), run.reason[1])
            run.finish(Outcome(msg.status_code, msg.body, msg.message))
        limit = self.cfg.max_jobs_per_child
        if child.state == "ready" and (msg.recycle or (limit and child.jobs_done >= limit)):
            if not child.jobs:
                why = "the handler asked for it" if msg.recycle else f"{limit} jobs served"
                logger.info(f"recycling handler process {child.pid}: {why}")
                child.stop()
                self._scale()
        if self.pending:
            self._pump()
        self._notify()

    def _on_exit(self, child: ChildProcess, code: int) -> None:
        was_ready = child.was_ready
        clean = child.state == "stopping" and code == 0
        child.state = "dead"
        self.children.pop(child.cid, None)
        # "killed by SIGKILL (out of memory...)" only when we did not kill it ourselves
        what = ("was stopped by the supervisor" if child.killed_on_purpose
                else child.protocol_error or describe_exit(code))
        # the log line names the request it took down, when it was running one
        ran = [run.job.request_id for run in child.jobs.values()]
        request_id = ran[0] if len(ran) == 1 else ""
        for run in list(child.jobs.values()):
            self.runs.pop(run.job_id, None)
            if run.reason is not None:
                run.finish(_failed(*run.reason))
            else:
                why = (f" ({child.kill_reason})" if child.kill_reason
                       and not child.protocol_error else "")
                run.finish(_failed(500, f"handler process {child.pid} {what}{why} while "
                                        "running this request"))
        child.jobs.clear()
        if not clean and not self.closing:
            if not self.ever_ready:
                message = child.fatal or (f"handler process {child.pid} {what} before "
                                          "becoming ready")
                if not self.startup_error.done():
                    self.startup_error.set_result(message)
                return
            if child.killed_on_purpose:  # a job's cancel or timeout: expected, not a crash
                logger.info(f"handler process {child.pid} stopped ({child.kill_reason}); "
                            "starting a replacement", request_id=request_id)
            else:
                self._crashed(child, what, was_ready, request_id)
        self._pump()
        self._scale()
        self._notify()

    def _count_failure(self, what: str) -> None:
        """A crash or an out-of-memory error: after max_crashes in a row, give up."""
        self.crash_streak += 1
        limit = self.cfg.max_crashes
        if limit and self.crash_streak >= limit and not self.unhealthy:
            self.unhealthy = (f"{self.crash_streak} handler failures in a row "
                              f"(SPIRIT_MAX_CRASHES={limit}), the last: {what}")
            logger.error(f"worker unhealthy: {self.unhealthy}; taking no more jobs")
            self._fail_pending()

    def _fail_pending(self) -> None:
        """Jobs queued here (none started) fail now; running ones finish or fail."""
        for run in list(self.pending):
            self._stop_run(run, 503, f"worker unhealthy: {self.unhealthy}")
        self._notify()

    def _crashed(self, child: ChildProcess, what: str, was_ready: bool,
                 request_id: str) -> None:
        reason = (f" ({child.kill_reason})" if child.kill_reason and not child.protocol_error
                  else "")
        self._count_failure(f"handler process {child.pid} {what}{reason}")
        delay = 0.0 if self.crash_streak <= 1 else crash_retry(self.cfg).delay(
            self.crash_streak - 1)
        self._next_spawn = self._clock() + delay
        state = "" if was_ready else " before becoming ready"
        backoff = (f"; {self.crash_streak} crashes in a row, backing off {delay:.1f} s"
                   if delay else "")
        then = ("not replaced: the worker is unhealthy" if self.unhealthy
                else f"starting a replacement{backoff}")
        logger.error(f"handler process {child.pid} {what}{reason}{state}; {then}",
                     request_id=request_id)

    # ---- dispatch ---------------------------------------------------------------

    async def run(self, job: Job, on_chunk: ChunkSink | None = None) -> Outcome:
        """Run one job in a handler process; never raises for the job's own failures."""
        if self.unhealthy:
            return _failed(503, f"worker unhealthy: {self.unhealthy}")
        size = len(job.body) + len(job.webhook) + len(job.request_id) + len(job.mode) + 64
        if size > self.cfg.max_frame:  # the handler process would refuse the frame
            return _failed(413, f"request too large: {len(job.body)} bytes, the limit between "
                                f"supervisor and handler is {self.cfg.max_frame} bytes "
                                "(SPIRIT_MAX_FRAME_MB)")
        run = _Run(next(self._job_ids), job, on_chunk, self._loop)
        self.runs[run.job_id] = run
        self.pending.append(run)
        self._pump()
        return await run.future

    def _pick(self) -> ChildProcess | None:
        """An idle ready process; for async handlers else the least loaded one."""
        best: ChildProcess | None = None
        multiplex = self.is_async
        for child in self.children.values():
            if child.state != "ready":
                continue
            if not child.jobs:
                return child
            if multiplex and (best is None or len(child.jobs) < len(best.jobs)):
                best = child
        return best

    def _pump(self) -> None:
        while self.pending:
            child = self._pick()
            if child is None:
                break
            run = self.pending.popleft()
            run.child = child
            child.jobs[run.job_id] = run
            job = run.job
            child.send(ipc.Run(run.job_id, job.request_id, job.mode, job.webhook, job.body),
                       alone=len(child.jobs) == 1)
            if self.cfg.job_timeout > 0:
                run.timer = self._loop.call_later(
                    self.cfg.job_timeout, self._timed_out, run)
        if self.pending:  # more work than ready processes: maybe start some
            self._scale()

    def _wanted(self) -> int:
        if self.closing:
            return 0
        if self.kind is None:
            return 1
        if self.is_async:
            return max(1, self.cfg.async_children)
        busy = sum(1 for c in self.children.values() if c.jobs)
        want = busy + len(self.pending)
        idle = sum(1 for c in self.children.values() if c.state == "ready" and not c.jobs)
        return min(max(self.cfg.min_children, want, busy + idle), self.slots or 1)

    def _scale(self) -> None:
        if self.unhealthy:  # the worker is on its way out: loading a model again is waste
            return
        alive = [c for c in self.children.values() if c.state in ("starting", "ready")]
        missing = self._wanted() - len(alive)
        if missing <= 0:
            return
        wait = self._next_spawn - self._clock()
        if wait > 0:
            if self._spawn_timer is None:
                self._spawn_timer = self._loop.call_later(wait, self._spawn_due)
            return
        for _ in range(missing):
            self._spawn_now()

    def _spawn_due(self) -> None:
        self._spawn_timer = None
        self._scale()

    # ---- timeouts, cancellation, liveness -----------------------------------------

    def _timed_out(self, run: _Run) -> None:
        message = (f"request timeout: the handler ran longer than the "
                   f"{self.cfg.job_timeout:g} s job timeout")
        logger.warn(message, request_id=run.job.request_id)
        self._stop_run(run, 408, message)

    def cancel(self, request_id: str, status_code: int = 499,
               reason: str = "request cancelled") -> bool:
        for run in list(self.runs.values()):
            if run.job.request_id == request_id:
                self._stop_run(run, status_code, reason)
                return True
        return False

    def _stop_run(self, run: _Run, status_code: int, message: str) -> None:
        if run.future.done():
            return
        run.reason = (status_code, message)
        child = run.child
        if child is None:  # still queued here
            self.pending.remove(run)
            self.runs.pop(run.job_id, None)
            run.finish(_failed(status_code, message))
            self._notify()
        elif self.is_async:
            child.send(ipc.Cancel(run.job_id, status_code, message))
            # a task that ignores cancellation loses its process
            self._loop.call_later(5.0, self._cancel_overdue, run)
        else:
            child.kill(message, on_purpose=True)

    def _cancel_overdue(self, run: _Run) -> None:
        if not run.future.done() and run.child is not None:
            run.child.kill("a cancelled task did not stop within 5 s", on_purpose=True)

    async def _watchdog(self) -> None:
        tick = max(0.05, min(self.cfg.ping_interval, 1.0))
        last_ask = 0.0
        while True:
            await asyncio.sleep(tick)
            now = self._clock()
            live = [c for c in self.children.values()
                    if c.state in ("starting", "ready", "stopping", "lost")]
            for child in live:  # every message counts; a beat comes each ping_interval
                silent = now - child.last_seen
                if child.pid and silent > self.cfg.ping_timeout:
                    child.kill(f"unresponsive: no liveness beat for {silent:.0f} s")
            if self.ever_ready and now - last_ask >= self.cfg.concurrency_interval:
                last_ask = now
                # an idle process answers at once; a busy sync one only after its job
                ready = [c for c in live if c.state == "ready"]
                target = next((c for c in ready if not c.jobs), ready[0] if ready else None)
                if target is not None:
                    target.send(ipc.AskConcurrency(self.allowed))
            self._retire_idle(now)

    def _retire_idle(self, now: float) -> None:
        if self.is_async or self.closing:
            return
        ready = [c for c in self.children.values() if c.state in ("starting", "ready")]
        surplus = len(ready) - max(self.cfg.min_children, 1)
        for child in sorted(ready, key=lambda c: c.idle_since):
            if surplus <= 0:
                break
            if (child.state == "ready" and not child.jobs
                    and now - child.idle_since >= self.cfg.idle_timeout):
                logger.debug(f"retiring idle handler process {child.pid}")
                child.stop()
                surplus -= 1

    # ---- proxy mode -------------------------------------------------------------

    async def check_start(self) -> tuple[bool, str]:
        """Run the user's check_start once in a handler process."""
        child = next((c for c in self.children.values() if c.state == "ready"), None)
        if child is None:
            return False, "no handler process is ready"
        self._check = self._loop.create_future()
        child.send(ipc.CheckStart())
        return await self._check

    # ---- shutdown ---------------------------------------------------------------

    def hurry(self) -> None:
        """No more grace (a second SIGINT): running jobs end now with 503."""
        self._hurried = True
        for run in list(self.runs.values()):
            self._stop_run(run, 503, "worker stopped")
        self._notify()

    async def drain(self, grace: float) -> None:
        """Stop taking work; give running jobs ``grace`` seconds, then end them."""
        self.closing = True
        if self._hurried:
            grace = 0.0
        for run in list(self.pending):
            self._stop_run(run, 503, "worker shutting down before the request started")
        deadline = self._clock() + grace
        while self.runs and self._clock() < deadline:
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), max(0.0, deadline - self._clock()))
            except TimeoutError:
                break
        for run in list(self.runs.values()):
            self._stop_run(run, 503, f"worker shut down: the request did not finish within "
                                     f"the {grace:g} s grace period")
        await self.close()

    async def close(self) -> None:
        self.closing = True
        if self._spawn_timer is not None:
            self._spawn_timer.cancel()
        for child in list(self.children.values()):
            child.stop()
        deadline = self._clock() + 3.0
        while self.children and self._clock() < deadline:
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), deadline - self._clock())
            except TimeoutError:
                break
        for child in list(self.children.values()):
            child.kill("supervisor exiting")
        if self._watchdog_task is not None:
            self._watchdog_task.cancel()
        # the remaining tasks end as their (killed) processes are reaped
        await asyncio.gather(*self._tasks, return_exceptions=True)
