"""Webhook delivery: POST the result bytes, retried with exponential backoff."""

from __future__ import annotations

import asyncio

import aiohttp
from yarl import URL

from spirit_gpu.config import WorkerConfig
from spirit_gpu.log import logger


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
    delay = cfg.webhook_backoff
    error = ""
    for attempt in range(1, cfg.webhook_attempts + 1):
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
        if attempt < cfg.webhook_attempts:
            logger.warn(f"{error}; retrying in {delay:g} s (attempt {attempt} of "
                        f"{cfg.webhook_attempts})", request_id=request_id)
            await asyncio.sleep(delay)
            delay *= 2
    note = f"webhook delivery failed: {error}"
    logger.error(note, request_id=request_id)
    return note
