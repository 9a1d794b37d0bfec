"""Webhook delivery: POST the result bytes, retried with exponential backoff.

Delivery happens in the background (``WebhookSender``), after the job's handler
slot is free: a webhook that never answers costs a delivery worker, never a
handler slot. At most ``webhook_concurrency`` deliveries run at once and at most
``webhook_queue`` wait; a job whose webhook finds the queue full waits for room
(its slot with it), so a burst slows the pulls down and loses nothing. Every
target is checked against the webhook policy (net/webhook_policy.py) before
each try, on the addresses the connection will use.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import msgspec
from yarl import URL

from spirit_gpu.config import WorkerConfig
from spirit_gpu.log import logger
from spirit_gpu.net.webhook_policy import PolicyResolver, WebhookPolicy
from spirit_gpu.retry import RetryPolicy

# called once a delivery ended: "" or why it failed
Finished = Callable[[str], Awaitable[None]]


def retry_policy(cfg: WorkerConfig) -> RetryPolicy:
    """``webhook_attempts`` tries, the first retry after ``webhook_backoff`` s, doubling."""
    return RetryPolicy(first=cfg.webhook_backoff, factor=2.0, max_delay=float("inf"),
                       attempts=max(1, cfg.webhook_attempts))


def worker_policy(cfg: WorkerConfig) -> WebhookPolicy:
    """The policy a worker applies: the agent's host:port only for its webhook relay."""
    return WebhookPolicy.for_worker(cfg.agent_url, cfg.webhook_allow)


async def deliver(session: aiohttp.ClientSession, cfg: WorkerConfig, webhook: str,
                  request_id: str, status_code: int, body: bytes,
                  policy: WebhookPolicy | None = None) -> str:
    """Deliver once it answers 200; return "" or the reason of the final failure.

    Connection errors and 5xx answers are retried; any other non-200 answer, and
    a target the policy refuses, is a final delivery failure (the reference
    semantics).
    """
    try:
        url = URL(webhook).update_query(requestID=request_id, statusCode=str(status_code))
        if not url.is_absolute():
            raise ValueError("not an absolute URL")
    except (ValueError, TypeError) as exc:
        return _failed(f"webhook {webhook!r} is not a valid URL: {exc}", 0, request_id)
    timeout = aiohttp.ClientTimeout(total=cfg.webhook_timeout)
    relay = policy is not None and policy.is_relay(url)
    retry = retry_policy(cfg)
    error, tries = "", 0
    async for attempt in retry.attempts_of():
        tries = attempt
        if policy is not None:
            refused = await policy.refusal(url)
            if refused:
                error = f"webhook refused: {refused}"
                break
        try:
            async with session.post(url, data=body, timeout=timeout,
                                    headers={"Content-Type": "application/json"}) as resp:
                answer = await resp.read()
                if resp.status == 200:
                    return ""
                if relay and resp.status != 503:
                    # the gateway's relay tried the client's webhook itself, retries
                    # included, and answers this call again with what it remembers: its
                    # words are the failure, and trying again would change nothing
                    note = _error_of(answer) or f"webhook relay answered {resp.status}"
                    logger.error(note, request_id=request_id)
                    return note
                error = f"webhook answered {resp.status}{_why(answer)}"
                if resp.status < 500:
                    break
        except (aiohttp.ClientError, TimeoutError) as exc:
            # through the relay it is our gateway that is away, not the client's webhook
            away = "the gateway's webhook relay" if relay else "webhook"
            error = f"{away} unreachable: {str(exc) or type(exc).__name__}"
        if attempt < (retry.attempts or 0):
            logger.warn(f"{error}; retrying in {retry.delay(attempt):g} s (attempt {attempt} "
                        f"of {retry.attempts})", request_id=request_id)
    return _failed(error, tries, request_id)


def _error_of(answer: bytes) -> str:
    """The ``{"error": ...}`` of an answer, shortened; "" when it has none."""
    try:
        error = msgspec.json.decode(answer[:2048]).get("error")
    except (msgspec.DecodeError, AttributeError):
        return ""
    return str(error)[:300] if error else ""


def _why(answer: bytes) -> str:
    error = _error_of(answer)
    return f" ({error})" if error else ""


def _failed(error: str, tries: int, request_id: str) -> str:
    after = f" after {tries} {'try' if tries == 1 else 'tries'}" if tries else ""
    note = f"webhook delivery failed{after}: {error}"
    logger.error(note, request_id=request_id)
    return note


@dataclass
class _Delivery:
    webhook: str
    request_id: str
    status_code: int
    body: bytes
    finished: Finished


class WebhookSender:
    """Background webhook delivery with bounded concurrency and a bounded queue."""

    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.policy = worker_policy(cfg)
        self._queue: asyncio.Queue[_Delivery] = asyncio.Queue(max(1, cfg.webhook_queue))
        self._workers: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._busy = 0

    @property
    def pending(self) -> int:
        """Deliveries queued or under way."""
        return self._queue.qsize() + self._busy

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None:
            # its own session: its resolver applies the policy to every address it
            # connects to (a DNS name that turns into a forbidden address is refused)
            connector = aiohttp.TCPConnector(limit=0, resolver=PolicyResolver(lambda: self.policy))
            self._session = aiohttp.ClientSession(connector=connector,
                                                  cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def submit(self, webhook: str, request_id: str, status_code: int, body: bytes,
                     finished: Finished) -> None:
        """Queue a delivery (waiting for room); ``finished`` gets its outcome."""
        if len(self._workers) < max(1, self.cfg.webhook_concurrency):
            self._workers.append(asyncio.ensure_future(self._work()))
        # a full queue holds the job (and so its slot) until there is room: under a
        # burst the worker pulls more slowly, and no result is ever dropped
        await self._queue.put(_Delivery(webhook, request_id, status_code, body, finished))

    async def _work(self) -> None:
        while True:
            item = await self._queue.get()
            self._busy += 1
            try:
                try:
                    failure = await deliver(self._session_now(), self.cfg, item.webhook,
                                            item.request_id, item.status_code, item.body,
                                            self.policy)
                except asyncio.CancelledError:  # shutdown: the job still gets its ack
                    await item.finished(_failed("the worker shut down during delivery", 0,
                                                item.request_id))
                    raise
                await item.finished(failure)
            except Exception as exc:  # one delivery's bug must not stop the others
                logger.error(f"webhook delivery crashed: {exc!r}", request_id=item.request_id)
            finally:
                self._busy -= 1
                self._queue.task_done()

    async def close(self, grace: float) -> None:
        """Give pending deliveries ``grace`` seconds; those left report the shutdown."""
        if self.pending:
            logger.info(f"waiting up to {grace:g} s for {self.pending} webhook deliveries")
            try:
                await asyncio.wait_for(self._queue.join(), grace)
            except TimeoutError:
                pass
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        while not self._queue.empty():
            item = self._queue.get_nowait()
            await item.finished(_failed("the worker shut down before it was sent", 0,
                                        item.request_id))
        if self._session is not None:
            await self._session.close()
