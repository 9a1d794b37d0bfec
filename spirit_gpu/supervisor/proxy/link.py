"""The worker end of the proxy link: proxied exchanges arrive over one WebSocket.

The worker dials the gateway (so a worker behind NAT needs no reachable
listener), and each ``LinkOpen`` becomes a request to the LLM server whose
answer goes back as ``LinkHead``/``LinkData``/``LinkEnd`` frames. Exchanges
share the listener's client pool, statistics, drain and log lines. The link
redials with back-off while the agent offers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator

import aiohttp

from spirit_gpu.config import WorkerConfig
from spirit_gpu.log import logger
from spirit_gpu.net.frame_writer import FrameWriter
from spirit_gpu.net.relay import HOP_BY_HOP, error_body, filter_pairs
from spirit_gpu.protocol.agent import join_url
from spirit_gpu.protocol.proxy import (
    LinkCancel,
    LinkData,
    LinkEnd,
    LinkFail,
    LinkHead,
    LinkOpen,
    decode_frames,
)
from spirit_gpu.retry import Backoff, RetryPolicy
from spirit_gpu.supervisor.proxy.listener import (
    DROP,
    NOT_READY,
    ProxyListener,
    new_request_id,
)
from spirit_gpu.supervisor.proxy.register import Registrar
from spirit_gpu.supervisor.proxy.upstream import InvalidRequest

_JSON = [("Content-Type", "application/json")]
RECONNECT_RETRY = RetryPolicy(first=0.1, factor=2.0, max_delay=2.0)


class WorkerLink:
    def __init__(self, cfg: WorkerConfig, listener: ProxyListener, registrar: Registrar) -> None:
        self.cfg = cfg
        self.listener = listener
        self.registrar = registrar
        self.connected = asyncio.Event()
        self._headers = ({"Authorization": f"Bearer {cfg.worker_token}"}
                         if cfg.worker_token else {})

    async def run(self) -> None:
        """Keep the link up while the agent offers it (cancel to stop)."""
        backoff = Backoff(RECONNECT_RETRY)
        async with aiohttp.ClientSession() as session:
            while True:
                await self.registrar.link_offered.wait()
                url = (join_url(self.cfg.agent_url, self.registrar.link_path)
                       + f"?workerID={self.registrar.worker_id}")
                try:
                    async with session.ws_connect(url, headers=self._headers, max_msg_size=0,
                                                  heartbeat=30.0) as ws:
                        logger.info(f"proxy link to {url} up")
                        backoff.reset()
                        self.connected.set()
                        await self._serve(ws)
                    logger.info("proxy link closed by the gateway")
                except (aiohttp.ClientError, OSError) as exc:
                    logger.warn(f"proxy link to {url} failed: {exc!r}; retrying")
                finally:
                    self.connected.clear()
                await backoff.sleep()

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        writer = FrameWriter(ws)
        tasks: dict[int, asyncio.Task[None]] = {}
        bodies: dict[int, asyncio.Queue[bytes | None]] = {}

        def forget(exchange: int, _: object = None) -> None:
            tasks.pop(exchange, None)
            bodies.pop(exchange, None)

        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.BINARY:
                    continue
                for frame in decode_frames(msg.data):
                    if isinstance(frame, LinkOpen):
                        body: asyncio.Queue[bytes | None] | None = None
                        if frame.more:
                            body = bodies[frame.id] = asyncio.Queue()
                        task = asyncio.create_task(self._exchange(frame, writer, body))
                        tasks[frame.id] = task
                        task.add_done_callback(functools.partial(forget, frame.id))
                    elif isinstance(frame, LinkData):
                        if frame.id in bodies:
                            bodies[frame.id].put_nowait(frame.data)
                    elif isinstance(frame, LinkEnd):
                        if frame.id in bodies:
                            bodies[frame.id].put_nowait(None)
                    elif isinstance(frame, LinkCancel):
                        if frame.id in tasks:
                            tasks[frame.id].cancel()
        finally:
            for task in list(tasks.values()):
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            await writer.close()

    async def _exchange(self, frame: LinkOpen, writer: FrameWriter,
                        body_queue: asyncio.Queue[bytes | None] | None) -> None:
        listener = self.listener
        exchange = frame.id
        if not listener.ready:
            _answer(writer, exchange, 503, error_body(frame.path, 503, NOT_READY))
            return
        rid = frame.request_id or new_request_id()
        key, started = listener.begin(rid)
        status, nbytes, note = 0, 0, ""
        path = frame.path.split("?", 1)[0]
        try:
            headers = filter_pairs(frame.headers, DROP)
            data = frame.body if body_queue is None else _body(frame.body, body_queue)
            try:
                upstream = await listener.upstream.request(frame.method, frame.path, headers,
                                                           data)
            except InvalidRequest as exc:
                status, note = 400, str(exc)
                _answer(writer, exchange, 400, error_body(frame.path, 400, note))
                return
            except OSError as exc:
                status, note = 502, f"upstream {listener.base_url} unreachable: {exc!r}"
                listener.stats.failed += 1
                _answer(writer, exchange, 502, error_body(frame.path, 502, note))
                return
            try:
                status = upstream.status
                listener.stats.first_bytes.append(time.monotonic() - started)
                writer.send(LinkHead(exchange, status, upstream.reason,
                                     filter_pairs(upstream.headers, HOP_BY_HOP)))
                while True:
                    try:
                        chunk = await upstream.read()
                    except OSError as exc:
                        note = f"cut (upstream): {exc!r}"
                        listener.stats.cut += 1
                        writer.send(LinkFail(exchange, f"the LLM server failed mid-answer: "
                                                       f"{exc!r}"))
                        break
                    if not chunk:
                        writer.send(LinkEnd(exchange))
                        break
                    writer.send(LinkData(exchange, chunk))
                    nbytes += len(chunk)
                    await writer.wait_drained()
            finally:
                upstream.close()  # unfinished: aborts the upstream request
        except asyncio.CancelledError:
            note = "cancelled by the gateway (client gone or limit); upstream request aborted"
            listener.stats.cut += 1
            raise
        except Exception as exc:  # a bug: end this exchange, not the link, and say so
            note = f"failed: {exc!r}"
            logger.error(f"proxy exchange {frame.method} {path} failed", request_id=rid,
                         exc_info=True)
            writer.send(LinkFail(exchange, f"the worker failed: {exc!r}"))
        finally:
            listener.end(key, rid, started, frame.method, path, status, nbytes, note)


async def _body(first: bytes, rest: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
    if first:
        yield first
    while (chunk := await rest.get()) is not None:
        yield chunk


def _answer(writer: FrameWriter, exchange: int, status: int, body: bytes) -> None:
    reason = {400: "Bad Request", 502: "Bad Gateway", 503: "Service Unavailable"}.get(status, "")
    writer.send(LinkHead(exchange, status, reason, _JSON))
    writer.send(LinkData(exchange, body))
    writer.send(LinkEnd(exchange))


async def stop_link(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
