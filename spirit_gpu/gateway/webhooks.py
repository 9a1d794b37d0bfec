"""Webhooks the gateway sends itself, and the relay that keeps workers' webhooks honest.

A request the gateway ends (TTL in the queue, worker lost, cancel, queue
cleaned) never reaches a worker's result path, so the gateway delivers its
webhook: ``POST <webhook>?requestID=<id>&statusCode=<code>`` with
``{"error": <message>}``, retried with exponential backoff as a worker does.

A worker may still be running a request the gateway has ended (a worker that
ignores cancel notices, the original one included). So that it cannot report
200 to the client after the status said cancelled, workers on the plain
protocol see a webhook URL of the gateway's (``.../apis/v1/webhook/<id>``):
the relay makes the worker's call the request's terminal status when it is
the first, passes it on to the client's webhook, and drops it when the
gateway ended the request first. The first terminal status wins everywhere.
"""

from __future__ import annotations

import asyncio

import aiohttp
import msgspec
from yarl import URL

from spirit_gpu.gateway.storage.base import RequestRecord
from spirit_gpu.log import logger

ATTEMPTS = 3
FIRST_DELAY = 0.5
TIMEOUT = 10.0
RELAY_PATH = "webhook"  # under /agent/<sid>/apis/v1/


async def deliver(session: aiohttp.ClientSession, webhook: str, request_id: str,
                  status_code: int, body: bytes) -> tuple[int, str]:
    """POST once it answers 200 (retrying connection errors and 5xx).

    Returns the webhook's last status (0: unreachable) and "" or why it failed.
    """
    try:
        url = URL(webhook).update_query(requestID=request_id, statusCode=str(status_code))
    except (ValueError, TypeError) as exc:
        return 0, f"webhook {webhook!r} is not a valid URL: {exc}"
    delay, status, error = FIRST_DELAY, 0, ""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            async with session.post(url, data=body, timeout=aiohttp.ClientTimeout(total=TIMEOUT),
                                    headers={"Content-Type": "application/json"}) as resp:
                await resp.read()
                status = resp.status
                if status == 200:
                    return 200, ""
                error = f"webhook answered {status}"
                if status < 500:
                    break
        except (aiohttp.ClientError, TimeoutError) as exc:
            status, error = 0, f"webhook unreachable: {exc or type(exc).__name__}"
        if attempt < ATTEMPTS:
            await asyncio.sleep(delay)
            delay *= 2
    logger.error(f"webhook delivery failed: {error}", request_id=request_id)
    return status, error


class GatewayWebhooks:
    """Delivers the webhooks of requests the gateway ended; one session, tasks kept."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[object]] = set()

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    def on_finish(self, rec: RequestRecord) -> None:
        """Storage's finish hook: a gateway-ended request with a webhook gets it now."""
        if not rec.ended_by_gateway or not rec.webhook:
            return
        body = msgspec.json.encode({"error": rec.message or rec.status})
        task = asyncio.ensure_future(
            deliver(self.session(), rec.webhook, rec.request_id, rec.status_code, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
        for task in self._tasks:
            task.cancel()
        if self._session is not None:
            await self._session.close()
