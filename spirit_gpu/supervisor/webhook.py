"""Webhook delivery: POST the result bytes, retried with exponential backoff."""

from __future__ import annotations

import aiohttp
from yarl import URL

from spirit_gpu.config import WorkerConfig
from spirit_gpu.log import logger
from spirit_gpu.retry import RetryPolicy


def retry_policy(cfg: WorkerConfig) -> RetryPolicy:
    """``webhook_attempts`` tries, the first retry after ``webhook_backoff`` s, doubling."""
    return RetryPolicy(first=cfg.webhook_backoff, factor=2.0, max_delay=float("inf"),
                       attempts=max(1, cfg.webhook_attempts))


async def deliver(session: aiohttp.ClientSession, cfg: WorkerConfig, webhook: str,
                  request_id: str, status_code: int, body: bytes) -> str:
    """Deliver once it answers 200; return "" or the reason of the final failure.

    Connection errors and 5xx answers are retried; any other non-200 answer is a
    final delivery failure (the reference semantics).
    """
    try:
        url = URL(webhook).update_query(requestID=request_id, statusCode=str(status_code))
        if not url.is_absolute():
            raise ValueError("not an absolute URL")
    except (ValueError, TypeError) as exc:
        return f"webhook {webhook!r} is not a valid URL: {exc}"
    timeout = aiohttp.ClientTimeout(total=cfg.webhook_timeout)
    policy = retry_policy(cfg)
    error = ""
    async for attempt in policy.attempts_of():
        try:
            async with session.post(url, data=body, timeout=timeout,
                                    headers={"Content-Type": "application/json"}) as resp:
                await resp.read()
                if resp.status == 200:
                    return ""
                error = f"webhook answered {resp.status}"
                if resp.status < 500:
                    break
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = f"webhook unreachable: {exc or type(exc).__name__}"
        if attempt < (policy.attempts or 0):
            logger.warn(f"{error}; retrying in {policy.delay(attempt):g} s (attempt {attempt} "
                        f"of {policy.attempts})", request_id=request_id)
    note = f"webhook delivery failed: {error}"
    logger.error(note, request_id=request_id)
    return note
