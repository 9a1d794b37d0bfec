"""Proxy jobs from the request queue: how the hosted platform delivers proxied requests.

The hosted agent has no proxy registration. A proxied HTTP request arrives as
an ordinary job from ``GET /apis/v1/request`` whose body is
``{"method", "uri", "header", "body"(base64)}``; the worker runs it against
``base_url`` and streams the answer to
``POST /apis/v1/request-proxy/<id>?statusCode=<upstream status>`` with the
upstream's headers minus hop-by-hop ones (a body with a Content-Length is sent
whole, anything else chunked as it arrives). Metrics as for any job
(``executing``, then ``succeed``/``failed``); a failure before the answer
began gets ``request-proxy/<id>?statusCode=500`` with ``{"error"}``; a job
past its TTL gets 408; a body that is not that JSON gets a ``failed`` metric
naming the parse error; every job ends with the ack (DESIGN.md 5a).

``QueueJobs`` pulls only while the agent does not take the registration
extension (``Registrar.mode == "plain"``) and the LLM server is ready; where
our gateway offers registration, requests come to the listener or the proxy
link instead. Jobs count in the listener's in-flight set, so the plain
heartbeat names them and shutdown waits for them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import AsyncIterator

import aiohttp
import msgspec

from spirit_gpu.config import WorkerConfig
from spirit_gpu.log import logger
from spirit_gpu.net.relay import HOP_BY_HOP, filter_pairs
from spirit_gpu.protocol import agent
from spirit_gpu.supervisor.jobs import Job, metric, now_ms, ttl_expired
from spirit_gpu.supervisor.proxy.listener import ProxyListener
from spirit_gpu.supervisor.proxy.register import Registrar
from spirit_gpu.supervisor.proxy.upstream import Answer
from spirit_gpu.supervisor.transports.base import AgentUnavailable
from spirit_gpu.supervisor.transports.plain import PlainTransport

MAX_IN_FLIGHT = 64
_DROP = HOP_BY_HOP | {"content-length"}
_error = msgspec.json.Encoder()


class _StrictJob(msgspec.Struct):
    """``agent.ProxyJob`` with ``method`` and ``uri`` required, as the original reads it."""

    method: str
    uri: str
    header: dict[str, list[str]] = {}
    body: str = ""


_job = msgspec.json.Decoder(_StrictJob)


def parse_job(body: bytes) -> tuple[_StrictJob, bytes]:
    """The job and its decoded body; ``ValueError`` naming what is wrong."""
    try:
        job = _job.decode(body)
        data = base64.b64decode(job.body, validate=True) if job.body else b""
    except (msgspec.DecodeError, binascii.Error) as exc:
        raise ValueError(f"failed to parse proxy job: {exc}") from exc
    return job, data


class QueueJobs:
    def __init__(self, cfg: WorkerConfig, listener: ProxyListener, registrar: Registrar) -> None:
        self.cfg = cfg
        self.listener = listener
        self.registrar = registrar
        self.session = aiohttp.ClientSession(auto_decompress=False,
                                             cookie_jar=aiohttp.DummyCookieJar())
        self.transport = PlainTransport(self.session, cfg.agent_url, cfg.worker_token)
        self.jobs: set[asyncio.Task[None]] = set()
        self._slot = asyncio.Event()

    async def run(self) -> None:
        """Pull while the agent is plain and the LLM server ready (until cancelled)."""
        idle = 0.05
        while True:
            if self.registrar.mode != "plain" or not self.listener.ready:
                await asyncio.sleep(0.1)
                continue
            while len(self.jobs) >= MAX_IN_FLIGHT:
                self._slot.clear()
                await self._slot.wait()
            try:
                result = await self.transport.pull(1)
            except AgentUnavailable:
                await asyncio.sleep(min(5.0, idle * 4))
                idle = min(idle * 2, 1.25)
                continue
            if not result.jobs:
                if "longpoll" not in self.transport.features:
                    await asyncio.sleep(idle)
                    idle = min(idle * 2, self.cfg.pull_backoff_max)
                continue
            idle = 0.05
            for job in result.jobs:
                task = asyncio.ensure_future(self.serve(job))
                self.jobs.add(task)
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.jobs.discard(task)
        self._slot.set()

    async def close(self) -> None:
        if self.jobs:
            await asyncio.gather(*self.jobs, return_exceptions=True)
        await self.session.close()

    async def serve(self, job: Job) -> None:
        """One proxy job, start to ack."""
        key, started = self.listener.begin(job.request_id)
        status, nbytes, note, method, uri = 0, 0, "", "?", "?"
        try:
            status, nbytes, note, method, uri = await self._serve(job)
        except Exception as exc:  # noqa: BLE001 - a job's failure must not end the loop
            note = f"proxy job failed: {exc!r}"
            await self._metric(job, "failed", note)
        finally:
            await self.transport.ack(job)
            self.listener.end(key, job.request_id, started, method, uri, status, nbytes, note)

    async def _serve(self, job: Job) -> tuple[int, int, str, str, str]:
        at = now_ms()
        if ttl_expired(job, at):
            why = (f"request timeout: queued {at - job.enqueue_at} ms, longer than its time "
                   f"to live of {job.ttl_ms} ms")
            await self._metric(job, "failed", why)
            await self._answer_error(job, 408, why)
            return 408, 0, why, "?", "?"
        try:
            pj, body = parse_job(job.body)
        except ValueError as exc:
            await self._metric(job, "failed", str(exc))
            return 400, 0, str(exc), "?", "?"
        job.started_at = at
        await self._metric(job, "executing", "start executing")
        headers = filter_pairs(((k, v) for k, vs in pj.header.items() for v in vs), HOP_BY_HOP)
        try:
            upstream = await self.listener.upstream.request(pj.method, pj.uri, headers,
                                                            body or None)
        except OSError as exc:
            why = f"upstream {self.listener.base_url} unreachable: {exc!r}"
            await self._metric(job, "failed", why)
            await self._answer_error(job, 500, why)
            return 500, 0, why, pj.method, pj.uri
        try:
            sent, error = await self._answer(job, upstream)
        finally:
            upstream.close()
        finished = now_ms()
        if error:
            await self._metric(job, "failed", error, finished)
        else:
            await self._metric(job, "succeed", "succeed", finished)
        return upstream.status, sent, error, pj.method, pj.uri

    async def _answer(self, job: Job, upstream: Answer) -> tuple[int, str]:
        """Stream the upstream's answer to request-proxy: (bytes sent, "" or what failed)."""
        headers = dict(self.transport.headers)
        for name, value in filter_pairs(upstream.headers, _DROP):
            headers[name] = value if name not in headers else f"{headers[name]}, {value}"
        sent = 0

        async def stream() -> AsyncIterator[bytes]:
            nonlocal sent
            while chunk := await upstream.read():
                sent += len(chunk)
                yield chunk

        data: bytes | AsyncIterator[bytes]
        if upstream.content_length is not None:
            data = await upstream.read_all()
            sent = len(data)
        else:
            data = stream()
        url = agent.endpoint(self.cfg.agent_url, f"{agent.PROXY_ANSWER}/{job.request_id}")
        try:
            async with self.session.post(url, params={"statusCode": str(upstream.status)},
                                         data=data, headers=headers) as resp:
                text = await resp.text()
                if resp.status != 200:
                    return sent, f"agent answered {resp.status} to request-proxy: {text[:200]}"
        except (aiohttp.ClientError, OSError) as exc:
            return sent, f"failed to send the proxy answer: {exc!r}"
        return sent, ""

    async def _answer_error(self, job: Job, status: int, message: str) -> None:
        url = agent.endpoint(self.cfg.agent_url, f"{agent.PROXY_ANSWER}/{job.request_id}")
        headers = dict(self.transport.headers, **{"Content-Type": "application/json"})
        try:
            async with self.session.post(url, params={"statusCode": str(status)},
                                         data=_error.encode({"error": message}),
                                         headers=headers) as resp:
                await resp.read()
        except (aiohttp.ClientError, OSError) as exc:
            logger.error(f"failed to send the proxy error answer: {exc!r}",
                         request_id=job.request_id)

    async def _metric(self, job: Job, status: str, message: str, finished: int = 0) -> None:
        await self.transport.metric(job, metric(job, status, message, finished))
