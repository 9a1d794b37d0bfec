"""The supervisor: startup, main loop, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import Mapping

import aiohttp

from spirit_gpu.config import WorkerConfig, child_environ
from spirit_gpu.log import logger
from spirit_gpu.supervisor.pool import Pool, StartupFailed
from spirit_gpu.supervisor.pool_api import JobPool
from spirit_gpu.supervisor.transports.base import AgentUnavailable, Transport
from spirit_gpu.supervisor.transports.plain import PlainTransport

EXIT_STARTUP_FAILED = 3


_PROBE_BACKOFF_MAX = 2.0  # seconds between tries while the agent cannot be reached


class Supervisor:
    def __init__(self, cfg: WorkerConfig, script: str, args: list[str],
                 flags: dict[str, object] | None = None) -> None:
        self.cfg = cfg
        self.script = script
        self.args = args
        self.flags = flags or {}
        self.stop = asyncio.Event()
        self.signals: asyncio.Queue[int] = asyncio.Queue()

    def _resolve(self, start_options: Mapping[str, object]) -> WorkerConfig:
        """start() keys the script passed, under env vars and flags."""
        return WorkerConfig.from_sources(start_options, flags=self.flags)

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            # handlers only queue; the main loop decides what a signal means
            loop.add_signal_handler(sig, self.signals.put_nowait, sig)

    async def _watch_signals(self, pool: JobPool) -> None:
        count = 0
        while True:
            sig = await self.signals.get()
            count += 1
            if count == 1:
                logger.info(f"received {signal.Signals(sig).name}: draining (no new jobs, "
                            f"running ones get {self.cfg.grace_period:g} s)")
                self.stop.set()
            else:
                logger.warn(f"received {signal.Signals(sig).name} again: stopping now")
                pool.hurry()  # no more grace: running jobs end now with 503

    async def serve(self, pool: JobPool | None = None) -> int:
        """Run until drained; ``pool`` replaces the handler processes (in-process mode)."""
        self._install_signals()
        pool = pool or Pool(self.cfg, self.script, self.args, self._resolve,
                            child_env=child_environ(self.flags))
        watcher = asyncio.ensure_future(self._watch_signals(pool))
        try:
            await pool.start()
            try:
                await self._wait_ready(pool)
            except StartupFailed as exc:
                logger.error(f"no handler process could start, exiting: {exc}")
                return EXIT_STARTUP_FAILED
            if self.stop.is_set():
                return 0
            self.cfg = pool.cfg  # resolved once, with the script's start() keys
            gc.freeze()  # what start-up built lives on: full collections need not rescan it
            return await self._serve_mode(pool)
        finally:
            await pool.close()
            watcher.cancel()

    async def _wait_ready(self, pool: JobPool) -> None:
        ready = asyncio.ensure_future(pool.wait_ready())
        stopped = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait([ready, stopped], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if ready.done():
            ready.result()
        else:
            ready.cancel()

    async def _serve_mode(self, pool: JobPool) -> int:
        if pool.kind == "proxy":
            from spirit_gpu.supervisor.proxy.worker import serve_proxy
            base_url = str(pool.options.get("base_url", ""))
            return await serve_proxy(self.cfg, base_url, pool.check_start, self.stop)
        if self.cfg.test_mode:
            from spirit_gpu.supervisor.testserver import serve_test_mode
            return await serve_test_mode(self.cfg, pool, self.stop)
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        async with aiohttp.ClientSession(connector=connector) as session:
            transport = await self._transport(session)
            from spirit_gpu.supervisor.job_loop import Worker
            try:
                return await Worker(self.cfg, pool, transport, session).run(self.stop)
            finally:
                await transport.close()

    async def _probe(self, plain: PlainTransport) -> None:
        """Learn what the agent offers from a heartbeat's answer, waiting for the agent
        while it cannot be reached: a worker started before its gateway (the usual
        order in compose or a cluster) would otherwise stay on the plain protocol.
        Nothing could be pulled meanwhile anyway (plain.outage logs the wait once)."""
        delay = 0.1
        while not self.stop.is_set():
            try:
                await plain.heartbeat([])
                return
            except AgentUnavailable:
                if plain.answered:
                    return  # it answered, with an error: it offers nothing we know of
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), delay)
            delay = min(delay * 2, _PROBE_BACKOFF_MAX)

    async def _transport(self, session: aiohttp.ClientSession) -> Transport:
        plain = PlainTransport(session, self.cfg.agent_url, self.cfg.worker_token)
        choice = self.cfg.transport
        if choice == "plain":
            return plain
        if choice == "auto":
            await self._probe(plain)
            if "link" not in plain.features:
                return plain
        try:
            from spirit_gpu.supervisor.transports.link import LinkTransport
            link = LinkTransport(session, self.cfg.agent_url, self.cfg.worker_token)
            await link.connect()
            logger.info("connected to the agent over the multiplexed link")
            return link
        except Exception as exc:  # fall back: the plain protocol always works
            logger.warn(f"multiplexed link unavailable ({exc}); using the plain protocol")
            return plain
