"""Debugging mode (SPIRIT_IN_PROCESS): handlers run inside the supervisor process.

No isolation: a crash takes the worker down, a sync handler past its timeout
keeps its thread. It exists so a debugger or profiler sees the handler and the
worker loop in one process.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

from spirit_gpu import handlers
from spirit_gpu.config import WorkerConfig, start_options
from spirit_gpu.env import Env
from spirit_gpu.handlers import BadRequest, Outcome, error_body, prepare_request
from spirit_gpu.log import logger
from spirit_gpu.supervisor.jobs import Job


class _InProcessRun:
    def __init__(self, job: Job, task: asyncio.Task[Outcome]) -> None:
        self.job = job
        self.task = task
        self.reason: tuple[int, str] | None = None


class InProcessPool:
    """The Pool interface the worker loop uses, with the handler called directly."""

    def __init__(self, cfg: WorkerConfig, config: dict[str, Any]) -> None:
        self.cfg = cfg
        self.options: dict[str, object] = start_options(config)
        self.handler: handlers.Handler | None = config.get("handler")
        self.kind: str | None = ("proxy" if self.options["mode"] == "proxy" or self.handler is None
                     else handlers.handler_kind(self.handler))
        self.modifier: Callable[[int], Any] | None = config.get("concurrency_modifier")
        self.check: Callable[[], Any] | None = config.get("check_start")
        self.allowed = handlers.call_concurrency_modifier(self.modifier, 1)
        self.runs: dict[int, _InProcessRun] = {}
        self.changed = asyncio.Event()
        self.listeners: list[Callable[[], None]] = []
        self.closing = False
        self.unhealthy = ""  # in-process handlers never give up
        self._hurried = False
        self._ids = itertools.count(1)

    @property
    def slots(self) -> int:
        return 0 if self.closing else self.allowed


    def running_request_ids(self) -> list[str]:
        return [r.job.request_id for r in self.runs.values()]

    async def start(self) -> None:
        return None

    async def wait_ready(self) -> None:
        return None

    def _notify(self) -> None:
        self.changed.set()
        for listener in self.listeners:
            listener()

    async def run(self, job: Job, on_chunk: handlers.EmitChunk | None = None) -> Outcome:
        job_id = next(self._ids)
        task = asyncio.ensure_future(self._call(job, on_chunk))
        run = self.runs[job_id] = _InProcessRun(job, task)
        timeout = self.cfg.job_timeout or None
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            task.cancel()
            message = f"request timeout: the handler ran longer than the {timeout:g} s job timeout"
            logger.warn(message, request_id=job.request_id)
            return Outcome(408, error_body(message), message)
        except asyncio.CancelledError:
            if run.reason is None:
                raise
            return Outcome(run.reason[0], error_body(run.reason[1]), run.reason[1])
        finally:
            self.runs.pop(job_id, None)
            self.allowed = handlers.call_concurrency_modifier(self.modifier, self.allowed)
            self._notify()

    async def _call(self, job: Job, on_chunk: handlers.EmitChunk | None) -> Outcome:
        env = Env(request_id=job.request_id, mode=job.mode, webhook=job.webhook,
                  agent_url=self.cfg.agent_url)
        try:
            request = prepare_request(job.body, job.request_id)
        except BadRequest as exc:
            return Outcome(400, error_body(str(exc)), str(exc))
        assert self.handler is not None
        return await handlers.run_async(self.handler, self.kind or handlers.SYNC, request, env,
                                        on_chunk)

    def cancel(self, request_id: str, status_code: int = 499,
               reason: str = "request cancelled") -> bool:
        for run in self.runs.values():
            if run.job.request_id == request_id:
                run.reason = (status_code, reason)
                run.task.cancel()
                return True
        return False

    async def check_start(self) -> tuple[bool, str]:
        return await asyncio.to_thread(handlers.call_check_start, self.check)

    def hurry(self) -> None:
        self._hurried = True
        for run in list(self.runs.values()):
            self.cancel(run.job.request_id, 503, "worker stopped")

    async def drain(self, grace: float) -> None:
        self.closing = True
        if self._hurried:
            grace = 0.0
        tasks = [r.task for r in self.runs.values()]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        for run in list(self.runs.values()):
            self.cancel(run.job.request_id, 503, "worker shut down before the request finished")

    async def close(self) -> None:
        self.closing = True


def run_in_process(config: dict[str, Any]) -> int:
    """Serve start()'s config with handlers in this process (SPIRIT_IN_PROCESS=1)."""
    from spirit_gpu.loop import run
    from spirit_gpu.supervisor.app import Supervisor

    cfg = WorkerConfig.from_sources(start_options(config))
    logger.set_level(cfg.log_level)  # start()'s "log_level", unless env or a flag says
    logger.warn("SPIRIT_IN_PROCESS: handlers run inside the worker process, without "
                "isolation (debugging only)")

    async def serve() -> int:
        supervisor = Supervisor(cfg, "", [])
        return await supervisor.serve(InProcessPool(cfg, config))

    code = run(serve())
    return int(code) if isinstance(code, int) else 0
