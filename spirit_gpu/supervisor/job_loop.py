"""The job loop: take requests from the platform, run them, report everything."""

from __future__ import annotations

import asyncio

import aiohttp

from spirit_gpu.config import WorkerConfig
from spirit_gpu.handlers import ASYNC_GENERATOR, GENERATOR, Outcome, error_body
from spirit_gpu.log import logger
from spirit_gpu.retry import Backoff, RetryPolicy
from spirit_gpu.supervisor.jobs import Job, metric, now_ms, ttl_expired
from spirit_gpu.supervisor.pool_api import EXIT_UNHEALTHY, JobPool
from spirit_gpu.supervisor.transports.base import AgentUnavailable, Transport
from spirit_gpu.supervisor.webhook import WebhookSender

STREAMING_KINDS = (GENERATOR, ASYNC_GENERATOR)
CANCELLED = "request cancelled by the client"  # a cancel's message, running or not yet
# an unreachable agent: wait longer each time, at most 5 s
AGENT_DOWN_RETRY = RetryPolicy(first=0.2, factor=2.0, max_delay=5.0)


def empty_queue_retry(cfg: WorkerConfig) -> RetryPolicy:
    """An empty queue without long-polling: poll less often, up to pull_backoff_max."""
    return RetryPolicy(first=0.05, factor=2.0, max_delay=cfg.pull_backoff_max)


class ChunkRelay:
    """Sends one job's generator chunks to the platform in order, off the hot path."""

    def __init__(self, transport: Transport, job: Job) -> None:
        self.transport = transport
        self.job = job
        self.queue: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue()
        self.task = asyncio.ensure_future(self._send())

    def push(self, seq: int, data: bytes) -> None:
        self.queue.put_nowait((seq, data))

    async def _send(self) -> None:
        while (item := await self.queue.get()) is not None:
            await self.transport.chunk(self.job, *item)

    async def finish(self) -> None:
        self.queue.put_nowait(None)
        await self.task


class Worker:
    def __init__(self, cfg: WorkerConfig, pool: JobPool, transport: Transport,
                 session: aiohttp.ClientSession) -> None:
        self.cfg = cfg
        self.pool = pool
        self.transport = transport
        self.session = session
        self.reserved = 0  # pulls in flight + jobs running: never more than pool.slots
        self.kick = asyncio.Event()  # a slot freed or the pool's capacity changed
        self._resize = asyncio.Event()  # pool.slots changed (or stop): re-count pullers
        self._slots_seen = 0
        self.jobs: set[asyncio.Task[None]] = set()
        self.exit_code = 0
        self.webhooks = WebhookSender(cfg)  # in the background: a slow webhook holds no slot
        self._stop: asyncio.Event | None = None
        # a multiplexed transport hands over many jobs per pull: one puller is enough;
        # the plain protocol pulls one job per request, one request per free slot
        self.batched = transport.capabilities.batched_pulls
        self.instant_metrics = transport.capabilities.instant_metrics

    async def run(self, stop: asyncio.Event) -> int:
        """Serve until ``stop`` is set (or the agent says it is unhealthy)."""
        self._stop = stop
        self.pool.listeners.append(self._pool_changed)
        self.transport.on_cancel(self._cancel)
        pullers: list[asyncio.Task[None]] = []
        heartbeat = asyncio.ensure_future(self._heartbeats())
        stop_wait = asyncio.ensure_future(stop.wait())
        stop_wait.add_done_callback(lambda _: self._resize.set())
        try:
            while not stop.is_set():
                # woken only when the pool's size changes, not after every job
                self._resize.clear()
                self._slots_seen = self.pool.slots
                while len(pullers) < (1 if self.batched else max(1, self._slots_seen)):
                    pullers.append(asyncio.ensure_future(self._puller(stop)))
                await self._resize.wait()
        finally:
            stop_wait.cancel()
            for task in pullers:
                task.cancel()
            await asyncio.gather(*pullers, return_exceptions=True)
            await self.pool.drain(self.cfg.grace_period)
            if self.jobs:  # their results are still being reported
                await asyncio.gather(*self.jobs, return_exceptions=True)
            await self.webhooks.close(self.cfg.grace_period)
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
        return self.exit_code

    def _pool_changed(self) -> None:
        if self.pool.unhealthy and self._stop is not None and not self._stop.is_set():
            # stop pulling; what is held still gets its result, then exit non-zero
            logger.error(f"worker unhealthy, exiting with status {EXIT_UNHEALTHY} once the "
                         f"running jobs are reported: {self.pool.unhealthy}")
            self.exit_code = EXIT_UNHEALTHY
            self._stop.set()
        self.kick.set()
        if self.pool.slots != self._slots_seen:
            self._resize.set()

    async def _take_slots(self) -> int:
        """Reserve free slots: one for a plain pull, all free ones for a batched pull."""
        while self.reserved >= self.pool.slots:
            self.kick.clear()
            await self.kick.wait()
        n = self.pool.slots - self.reserved if self.batched else 1
        self.reserved += n
        return n

    def _free_slot(self, n: int = 1) -> None:
        self.reserved -= n
        self.kick.set()

    async def _puller(self, stop: asyncio.Event) -> None:
        idle = Backoff(empty_queue_retry(self.cfg))
        down = Backoff(AGENT_DOWN_RETRY)
        while not stop.is_set():
            taken = await self._take_slots()
            try:
                result = await self.transport.pull(taken)
            except AgentUnavailable:
                self._free_slot(taken)
                await down.sleep()
                continue
            except BaseException:
                self._free_slot(taken)
                raise
            down.reset()
            if len(result.jobs) < taken:
                self._free_slot(taken - len(result.jobs))
            if not result.healthy and not self.pool.running_request_ids() and not self.jobs:
                logger.error("agent reports it is unhealthy (X-Agent-Health: false) and no "
                             "job is running: exiting with status 1")
                self.exit_code = 1
                stop.set()
            if not result.jobs:
                if "longpoll" not in self.transport.features:
                    await idle.sleep()
                continue
            idle.reset()
            for job in result.jobs:
                task = asyncio.ensure_future(self._process(job))
                self.jobs.add(task)
                task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self.jobs.discard(task)
        self._free_slot()

    async def _process(self, job: Job) -> None:
        started = now_ms()
        if ttl_expired(job, started):
            waited = started - job.enqueue_at
            message = (f"request timeout: queued {waited} ms, longer than its time to live "
                       f"of {job.ttl_ms} ms")
            await self._report(job, Outcome(408, error_body(message), message))
            return
        if job.cancelled:  # in the same read as the job, say: it must not start
            logger.info("cancelled before it started", request_id=job.request_id)
            await self._report(job, Outcome(499, error_body(CANCELLED), CANCELLED))
            return
        job.started_at = started
        executing: asyncio.Future[None] | None = None
        if self.instant_metrics:  # only queues a frame: no task needed
            await self.transport.metric(job, metric(job, "executing"))
        else:  # an HTTP call: it must not hold up the job
            executing = asyncio.ensure_future(
                self.transport.metric(job, metric(job, "executing")))
        streams = self.pool.kind in STREAMING_KINDS
        relay = ChunkRelay(self.transport, job) if streams else None
        try:
            outcome = await self.pool.run(job, relay.push if relay else None)
        finally:
            if relay is not None:
                await relay.finish()
            if executing is not None:
                await executing
        await self._report(job, outcome)

    async def _report(self, job: Job, outcome: Outcome) -> None:
        """The result at once; with a webhook, the final metric and the ack follow its
        delivery, in the background (the job's slot is free meanwhile), so that the
        status message can say the delivery failed."""
        finished = now_ms()
        await self.transport.result(job, outcome.status_code, outcome.message, outcome.body)
        if not job.webhook:
            await self._finish(job, outcome, finished, "")
            return

        async def delivered(failure: str) -> None:
            await self._finish(job, outcome, finished, failure)
        await self.webhooks.submit(job.webhook, job.request_id, outcome.status_code,
                                   outcome.body, delivered)

    async def _finish(self, job: Job, outcome: Outcome, finished: int, failure: str) -> None:
        message = outcome.message
        if failure:
            message = f"{message}; {failure}" if message else failure
        status = "succeed" if 200 <= outcome.status_code < 300 else "failed"
        await self.transport.metric(job, metric(job, status, message, finished))
        await self.transport.ack(job)

    async def _heartbeats(self) -> None:
        while True:
            try:
                reply = await self.transport.heartbeat(self.pool.running_request_ids())
            except AgentUnavailable:
                reply = None
            for request_id in reply.cancel if reply is not None else []:
                self._cancel(request_id)
            await asyncio.sleep(self.cfg.heartbeat_interval)

    def _cancel(self, request_id: str) -> bool:
        if self.pool.cancel(request_id, 499, CANCELLED):
            logger.info("cancelling running request", request_id=request_id)
            return True
        return False
