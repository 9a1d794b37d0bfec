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
Workers on the multiplexed link get the same relay URL in their ``Dispatch``.

Every client webhook is checked against the webhook policy
(net/webhook_policy.py) when the public API accepts it and before each try
here; the gateway's own listeners are learned from the requests it accepts
(a gateway on port 0 only knows its port then).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
import msgspec
from yarl import URL

from spirit_gpu.gateway.config import GatewayConfig
from spirit_gpu.gateway.storage.base import RequestRecord
from spirit_gpu.log import logger
from spirit_gpu.net.webhook_policy import PolicyResolver, WebhookPolicy

ATTEMPTS = 3
FIRST_DELAY = 0.5
TIMEOUT = 10.0
RELAY_PATH = "webhook"  # under /agent/<sid>/apis/v1/


async def deliver(session: aiohttp.ClientSession, webhook: str, request_id: str,
                  status_code: int, body: bytes,
                  policy: WebhookPolicy | None = None) -> tuple[int, str]:
    """POST once it answers 200 (retrying connection errors and 5xx).

    Returns the webhook's last status (0: unreachable or refused) and "" or why it
    failed ("webhook delivery failed after N tries: ...").
    """
    try:
        url = URL(webhook).update_query(requestID=request_id, statusCode=str(status_code))
    except (ValueError, TypeError) as exc:
        return 0, f"webhook delivery failed: webhook {webhook!r} is not a valid URL: {exc}"
    delay, status, error, tries = FIRST_DELAY, 0, "", 0
    for attempt in range(1, ATTEMPTS + 1):
        tries = attempt
        if policy is not None:
            refused = await policy.refusal(url)
            if refused:
                status, error = 0, f"webhook refused: {refused}"
                break
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
            status, error = 0, f"webhook unreachable: {str(exc) or type(exc).__name__}"
        if attempt < ATTEMPTS:
            await asyncio.sleep(delay)
            delay *= 2
    note = f"webhook delivery failed after {tries} {'try' if tries == 1 else 'tries'}: {error}"
    logger.error(note, request_id=request_id)
    return status, note


class GatewayWebhooks:
    """Delivers the webhooks of requests the gateway ended; one session, tasks kept."""

    def __init__(self, config: GatewayConfig | None = None) -> None:
        config = config or GatewayConfig()
        self._base = WebhookPolicy.for_gateway(config.host, config.port, config.webhook_allow)
        self.policy = self._base
        self._listeners: set[tuple[str, int]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        # a gateway-ended request's delivery failure, for its status message
        self.on_failure: Callable[[RequestRecord, str], Awaitable[None]] | None = None

    def listener(self, sockname: object) -> None:
        """A local address:port this gateway answered on (the request's socket)."""
        if isinstance(sockname, tuple) and len(sockname) >= 2:
            key = (str(sockname[0]), int(sockname[1]))
            if key not in self._listeners:
                self._listeners.add(key)
                self.policy = WebhookPolicy(allow=self._base.allow,
                                            own=self._base.own + tuple(sorted(self._listeners)))

    async def refusal(self, webhook: str) -> str:
        """"" or why the policy refuses ``webhook`` (the public API answers 400 with it)."""
        return await self.policy.refusal(webhook)

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                resolver=PolicyResolver(lambda: self.policy, own=True))
            self._session = aiohttp.ClientSession(connector=connector,
                                                  cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def deliver(self, webhook: str, request_id: str, status_code: int,
                      body: bytes) -> tuple[int, str]:
        return await deliver(self.session(), webhook, request_id, status_code, body,
                             self.policy)

    def on_finish(self, rec: RequestRecord) -> None:
        """Storage's finish hook: a gateway-ended request with a webhook gets it now."""
        if not rec.ended_by_gateway or not rec.webhook:
            return
        task = asyncio.ensure_future(self._deliver_ended(rec))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver_ended(self, rec: RequestRecord) -> None:
        body = msgspec.json.encode({"error": rec.message or rec.status})
        _, failure = await self.deliver(rec.webhook, rec.request_id, rec.status_code, body)
        if failure and self.on_failure is not None:
            await self.on_failure(rec, failure)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
        for task in self._tasks:
            task.cancel()
        if self._session is not None:
            await self._session.close()
