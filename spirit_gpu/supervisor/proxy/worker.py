"""Proxy mode: front a local LLM server (ollama, vLLM, ...) and stream its answers.

Life of a proxy worker, top to bottom:

1. start the listener (it answers 503 until ready) and the registrar (the
   agent learns the listener URL, ``ready=false``);
2. poll the user's ``check_start`` until it says True; past
   ``cfg.start_deadline`` the worker gives up with exit code 1;
3. ready: the registrar tells the agent at once, traffic flows (over the
   proxy link when the agent offers one, else to the listener);
4. on ``stop``: deregister, let in-flight streams finish (up to
   ``cfg.grace_period``), close, exit code 0.

The wire format of the registration extension is in ``spirit_gpu.protocol.proxy``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Literal

from spirit_gpu.config import WorkerConfig
from spirit_gpu.log import logger
from spirit_gpu.retry import Backoff, RetryPolicy
from spirit_gpu.supervisor.proxy.link import WorkerLink, stop_link
from spirit_gpu.supervisor.proxy.listener import ProxyListener
from spirit_gpu.supervisor.proxy.queue_jobs import QueueJobs
from spirit_gpu.supervisor.proxy.register import Registrar

CheckStart = Callable[[], Awaitable[tuple[bool, str]]]
FIRST_POLL = 0.05
MAX_POLL = 1.0
WAITING_NOTICE_EVERY = 10.0


async def serve_proxy(cfg: WorkerConfig, base_url: str, check_start: CheckStart,
                      stop: asyncio.Event) -> int:
    """Run proxy mode until ``stop`` is set; the process exit code."""
    listener = ProxyListener(base_url, cfg.proxy_host, cfg.proxy_port,
                             worker_token=cfg.worker_token,
                             advertise_url=cfg.proxy_advertise_url)
    try:
        await listener.start()
    except OSError as exc:
        logger.error(f"proxy listener cannot listen on {cfg.proxy_host}:{cfg.proxy_port}: "
                     f"{exc}; set SPIRIT_PROXY_HOST/SPIRIT_PROXY_PORT to a free address")
        return 1
    registrar = Registrar(cfg, listener)
    beating = asyncio.create_task(registrar.run(), name="proxy-registrar")
    linking = asyncio.create_task(WorkerLink(cfg, listener, registrar).run(), name="proxy-link")
    queue_jobs = QueueJobs(cfg, listener, registrar)  # where the agent does not register
    pulling = asyncio.create_task(queue_jobs.run(), name="proxy-queue-jobs")
    try:
        outcome = await wait_ready(check_start, cfg.start_deadline, stop)
        if outcome == "deadline":
            logger.error(f"check_start did not return True within {cfg.start_deadline:g}s "
                         f"(SPIRIT_START_DEADLINE); is the LLM server at {base_url} starting? "
                         "The worker exits.")
            return 1
        if outcome == "ready":
            listener.ready = True
            registrar.poke()
            logger.info(f"proxy worker ready: {listener.url} -> {base_url}")
            await stop.wait()
        logger.info("proxy worker stopping")
        return 0
    finally:
        listener.ready = False
        for task in (pulling, beating):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await registrar.deregister()
        await registrar.close()
        await listener.drain(cfg.grace_period)
        await queue_jobs.close()
        await stop_link(linking)
        await listener.close()


async def wait_ready(check_start: CheckStart, deadline: float,
                     stop: asyncio.Event) -> Literal["ready", "stopped", "deadline"]:
    """Poll ``check_start`` (errors logged, retried) until True, ``stop`` or the deadline."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + deadline
    next_notice = loop.time() + WAITING_NOTICE_EVERY
    poll = Backoff(RetryPolicy(first=FIRST_POLL, factor=2.0, max_delay=MAX_POLL))
    last_error = ""
    attempts = 0
    while not stop.is_set():
        remaining = give_up - loop.time()
        if remaining <= 0:
            return "deadline"
        attempts += 1
        try:
            async with asyncio.timeout(remaining):
                ok, error = await check_start()
        except TimeoutError:
            return "deadline"
        if ok:
            return "ready"
        if error and error != last_error:
            logger.error(f"check_start failed (attempt {attempts}, retrying): {error}")
        last_error = error
        if loop.time() >= next_notice:
            logger.info(f"waiting for check_start to return True ({attempts} attempts, "
                        f"{max(0.0, give_up - loop.time()):.0f}s left)")
            next_notice = loop.time() + WAITING_NOTICE_EVERY
        try:
            async with asyncio.timeout(min(poll.next(), max(0.0, give_up - loop.time()))):
                await stop.wait()
        except TimeoutError:
            pass
    return "stopped"
