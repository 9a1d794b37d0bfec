"""The gateway's shared core: what the public API, the plain agent API and the
link all call, so every path ends in the same storage calls."""

from __future__ import annotations

import asyncio
import base64
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web

from spirit_gpu.gateway.config import GatewayConfig
from spirit_gpu.gateway.metrics import GatewayMetrics
from spirit_gpu.gateway.storage.base import (
    CANCELLED_CODE,
    SHARED_WORKER_PREFIX,
    CancelOutcome,
    NewRequest,
    RequestRecord,
    Storage,
)
from spirit_gpu.gateway.webhooks import RELAY_PATH, GatewayWebhooks
from spirit_gpu.log import logger
from spirit_gpu.protocol import agent
from spirit_gpu.protocol.agent import Envelope

FEATURES = ("longpoll", "stream", "cancel", "link")
LINK_WORKER_PREFIX = "link:"  # names of workers on the multiplexed link, as storage records them
# how long a link worker's webhook call waits for the result its link carries
RELAY_WAITS_FOR_LINK = 10.0

CancelPusher = Callable[[list[str]], None]


_envelope = msgspec.json.Encoder()


def ease_headers(rec: RequestRecord) -> dict[str, str]:
    return {agent.MODE_HEADER: rec.mode, agent.REQUEST_ID_HEADER: rec.request_id,
            agent.ENQUEUE_AT_HEADER: str(rec.enqueued_at),
            agent.CREATE_AT_HEADER: str(rec.created_at),
            agent.TTL_HEADER: str(rec.ttl_ms), agent.WEBHOOK_HEADER: rec.webhook}


def envelope(rec: RequestRecord, agent_base: str = "") -> bytes:
    """The ``GET request`` answer. With ``agent_base`` (how the worker reaches this agent
    API), an async request's webhook is swapped for the gateway's relay (webhooks.py)."""
    body, headers = rec.body, ease_headers(rec)
    if agent_base and rec.webhook:
        relay = f"{agent_base}/{RELAY_PATH}/{rec.request_id}"
        if rec.mode == "async":  # the worker reads it from the body
            body = _relayed_webhook(body, relay)
        else:  # from the header
            headers[agent.WEBHOOK_HEADER] = relay
    return _envelope.encode(Envelope(headers=headers, body=base64.b64encode(body).decode()))


def _relayed_webhook(body: bytes, relay: str) -> bytes:
    try:
        decoded = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body  # the public API accepted it as JSON: cannot happen; leave it be
    if not isinstance(decoded, dict) or "webhook" not in decoded:
        return body
    decoded["webhook"] = relay
    return msgspec.json.encode(decoded)


def worker_identity(request: web.Request) -> str:
    """``Spirit-Worker-Id`` when sent; else the address, as a shared name (leases per
    request: several workers on one host may poll from it, see storage.base)."""
    return (request.headers.get(agent.WORKER_ID_HEADER)
            or f"{SHARED_WORKER_PREFIX}addr:{request.remote}")


# The original worker's wording when it drops a request past its TTL (DESIGN.md 5a).
_ORIGINAL_TTL_WORDS = "exceed ttl"


# How long, and for how many requests, the relay remembers its delivery.
RELAY_MEMORY = 600.0
RELAY_MEMORY_ENTRIES = 100_000


class Gateway:
    def __init__(self, config: GatewayConfig, storage: Storage,
                 metrics: GatewayMetrics) -> None:
        self.config = config
        self.storage = storage
        self.metrics = metrics
        self.links: dict[str, CancelPusher] = {}  # request id -> its link's cancel pusher
        self.stopping = False  # shutting down: sync clients still waiting are answered 503
        # called once when shutting down (each open link: stop dispatching, close when idle)
        self.on_stop: set[Callable[[], None]] = set()
        self.webhooks = GatewayWebhooks(config)
        self.webhooks.on_failure = self._webhook_failed
        # request id -> the proxy-route client waiting for its queued job's answer
        # (proxy/queued.py holds what goes in)
        self.proxy_answers: dict[str, asyncio.Future[Any]] = {}
        # request id -> the relay's one delivery to the client's webhook: a worker that
        # calls the relay again (its call timed out, it retries) gets that delivery's
        # answer instead of a second delivery
        self._relayed: OrderedDict[str, tuple[float, asyncio.Future[tuple[int, str]]]] = \
            OrderedDict()
        storage.on_finish = self._on_finish
        storage.on_remote_cancel = self.push_cancels
        self._sweeper: asyncio.Task[None] | None = None
        self._cancelling: set[asyncio.Task[CancelOutcome]] = set()

    # --- life --------------------------------------------------------------------
    async def start(self) -> None:
        await self.storage.start()
        self._sweeper = asyncio.create_task(self._sweep_forever())

    def stop_waiting(self) -> None:
        """Shutting down: sync requests still waiting are answered now (503), not cut;
        workers' long-polls end now with no job; links stop taking jobs and close once
        the jobs they run have ended (or when the shutdown's grace runs out)."""
        self.stopping = True
        self.storage.stop_waiting()
        for stop in list(self.on_stop):
            stop()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        await self.storage.drain()
        await self.storage.close()
        await self.webhooks.close()

    async def _webhook_failed(self, rec: RequestRecord, failure: str) -> None:
        message = f"{rec.message}; {failure}" if rec.message else failure
        await self.storage.annotate(rec.sid, rec.request_id, message)

    def _on_finish(self, rec: RequestRecord) -> None:
        self.metrics.on_finish(rec)
        self.webhooks.on_finish(rec)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval)
            await self.storage.sweep()

    # --- clients -------------------------------------------------------------------
    async def submit(self, req: NewRequest) -> RequestRecord:
        rec = await self.storage.submit(req)
        self.metrics.on_accept(rec.sid, rec.mode)
        return rec

    async def cancel(self, sid: str, request_id: str, sequence: int | None,
                     code: int = CANCELLED_CODE, message: str = "cancelled") -> CancelOutcome:
        outcome = await self.storage.cancel(sid, request_id, sequence, code, message)
        if outcome is CancelOutcome.CANCELLED_RUNNING:
            push = self.links.get(request_id)
            if push is not None:
                push([request_id])
        return outcome

    def cancel_soon(self, sid: str, request_id: str, code: int, message: str) -> None:
        """``cancel`` from where nothing can wait for it (a client's connection closing,
        a handler being cancelled)."""
        task = asyncio.ensure_future(self.cancel(sid, request_id, None, code, message))
        self._cancelling.add(task)
        task.add_done_callback(self._cancelling.discard)

    def push_cancels(self, request_ids: list[str]) -> None:
        """Running requests cancelled (here or through another replica): tell the links
        here that hold them."""
        for request_id in request_ids:
            push = self.links.get(request_id)
            if push is not None:
                push([request_id])

    # --- workers --------------------------------------------------------------------
    def long_poll_seconds(self, wait_ms: int) -> float:
        return max(0.0, min(wait_ms / 1000, self.config.long_poll_max,
                            self.config.lease_seconds / 2))

    def result_limit(self, mode: str) -> int:
        c = self.config
        return c.max_result_bytes_sync if mode == "sync" else c.max_result_bytes_async

    async def report_started(self, sid: str, request_id: str) -> None:
        await self.storage.mark_started(sid, request_id)

    async def report_result(self, sid: str, request_id: str, status_code: int, message: str,
                            data: bytes) -> str:
        """Store a worker's result. Returns "" or why it was refused (result too large)."""
        self.links.pop(request_id, None)
        if len(data) > min(self.result_limit("sync"), self.result_limit("async")):
            # only a result this large needs the request's mode (a read, which on a
            # networked store is a round trip)
            rec = await self.storage.get(sid, request_id)
            if rec is None:
                return "request not found"
            limit = self.result_limit(rec.mode)
            if len(data) > limit:
                why = (f"result too large: {len(data)} bytes, the limit for {rec.mode} "
                       f"requests is {limit} bytes")
                # the client reads why in its status; a link worker is not told, so
                # the operator is, here
                logger.warn(f"{sid}: the worker's result was refused: {why}",
                            request_id=request_id)
                await self.storage.finish(sid, request_id, 500, why,
                                          msgspec.json.encode({"error": why}))
                return why
        if await self.storage.finish(sid, request_id, status_code, message, data):
            return ""
        # ended already (the first end wins), or unknown
        return "" if await self.storage.get(sid, request_id) is not None else "request not found"

    async def report_failed(self, sid: str, request_id: str, message: str) -> None:
        """A ``failed`` metric: the request's end when no result came first.

        The original worker posts ``failed`` with no result when it cannot parse a
        job (and before its result otherwise: that result says the same). Ours
        posts its result first, so this changes nothing for it.
        """
        message = message or "the worker reported the request failed"
        code = 408 if _ORIGINAL_TTL_WORDS in message else 500
        if await self.storage.finish(sid, request_id, code, message,
                                     msgspec.json.encode({"error": message})):
            self.links.pop(request_id, None)
            logger.info(f"request failed by the worker's metric: {message}",
                        request_id=request_id)

    async def relay_webhook(self, sid: str, request_id: str, status_code: int,
                            data: bytes) -> tuple[int, str]:
        """A worker's webhook call (webhooks.py): the webhook's answer (status, why)."""
        rec = await self.storage.get_ended(sid, request_id)
        if rec is None:
            return 404, "request not found"
        if not rec.terminal and rec.holder.startswith(LINK_WORKER_PREFIX):
            # a link worker sent its result over the link before this call, after the
            # request's stream chunks: that result ends the request, once they are stored
            # (a link cut meanwhile sends them again); this call ends it only when it does
            # not come, so it never cuts a stream short
            rec = await self.storage.wait_done(sid, request_id, RELAY_WAITS_FOR_LINK) or rec
        if not rec.terminal:
            await self.report_result(sid, request_id, status_code, "", data)
            rec = await self.storage.get_ended(sid, request_id) or rec
        if rec.ended_by_gateway:
            return 200, f"dropped: the gateway ended the request first ({rec.status})"
        if not rec.webhook:
            return 200, "no webhook"
        known = self._relayed.get(request_id)
        delivery: asyncio.Future[tuple[int, str]]
        if known is None:
            delivery = asyncio.ensure_future(self.webhooks.deliver(
                rec.webhook, request_id, rec.status_code,
                rec.result if rec.result is not None else data))
            self._remember_relay(request_id, delivery)
        else:
            delivery = known[1]
        return await asyncio.shield(delivery)  # a caller that hangs up cancels nothing

    def _remember_relay(self, request_id: str, delivery: asyncio.Future[tuple[int, str]]) \
            -> None:
        """Kept while a worker may still retry its call (its tries span well under
        ``RELAY_MEMORY``), and no more than ``RELAY_MEMORY_ENTRIES`` of them."""
        at = asyncio.get_running_loop().time()
        relayed = self._relayed
        while relayed and (len(relayed) >= RELAY_MEMORY_ENTRIES
                           or next(iter(relayed.values()))[0] < at - RELAY_MEMORY):
            relayed.popitem(last=False)
        relayed[request_id] = (at, delivery)

    async def report_final(self, sid: str, request_id: str, status: str, message: str) -> None:
        """A worker's final metric (``succeed`` | ``failed``). Before a result it ends the
        request (``report_failed``); after its own result, a different message (its
        webhook's final failure, say) becomes the status message, the status unchanged.
        Nothing a worker says changes a request the gateway ended."""
        if status == "failed":
            await self.report_failed(sid, request_id, message)
        if not message:
            return
        rec = await self.storage.get(sid, request_id)
        if (rec is not None and rec.terminal and not rec.ended_by_gateway
                and rec.message != message):
            await self.storage.annotate(sid, request_id, message)


GATEWAY_KEY: web.AppKey[Gateway] = web.AppKey("spirit_gateway", Gateway)
"""Where ``create_app`` puts the ``Gateway``: ``app[GATEWAY_KEY]``."""
