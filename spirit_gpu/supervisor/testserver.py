"""EASE_TEST_MODE: a local HTTP server; ``POST /`` runs the handler on the body."""

from __future__ import annotations

import asyncio
import errno
import uuid

from aiohttp import web

from spirit_gpu.config import WorkerConfig
from spirit_gpu.log import logger
from spirit_gpu.protocol.agent import result_content_type
from spirit_gpu.supervisor.jobs import Job, now_ms
from spirit_gpu.supervisor.pool_api import EXIT_UNHEALTHY, JobPool

MAX_BODY = 20 * 1024 * 1024


async def serve_test_mode(cfg: WorkerConfig, pool: JobPool, stop: asyncio.Event) -> int:
    async def run(request: web.Request) -> web.Response:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return web.json_response({"error": f"body too large: the limit is {MAX_BODY} bytes"},
                                     status=413)
        request_id = request.headers.get("Ease-Request-Id") or f"test-{uuid.uuid4().hex}"
        job = Job(request_id=request_id, mode="sync", body=body, received_at=now_ms())
        job.started_at = job.received_at
        outcome = await pool.run(job)
        # the gateway's rule: JSON as application/json, a handler's raw bytes as
        # application/octet-stream
        ctype = result_content_type(outcome.body) if outcome.body else "application/json"
        return web.Response(status=outcome.status_code, body=outcome.body,
                            content_type=ctype, headers={"Ease-Request-Id": request_id})

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post("/", run)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, cfg.test_host, cfg.test_port)
    try:
        await site.start()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            reason = "the port is in use (pick another with EASE_TEST_PORT or --test-port)"
        logger.error(f"test mode: cannot listen on {cfg.test_host}:{cfg.test_port}: {reason}")
        await pool.drain(0)
        await runner.cleanup()
        return 1
    logger.info(f"test mode: POST http://{cfg.test_host}:{cfg.test_port}/ runs the handler")

    def unhealthy() -> None:  # as against a platform: answer what runs, then exit 4
        if pool.unhealthy and not stop.is_set():
            logger.error(f"worker unhealthy, exiting with status {EXIT_UNHEALTHY}: "
                         f"{pool.unhealthy}")
            stop.set()
    pool.listeners.append(unhealthy)
    try:
        await stop.wait()
    finally:
        await pool.drain(cfg.grace_period)
        await runner.cleanup()
    return EXIT_UNHEALTHY if pool.unhealthy else 0
