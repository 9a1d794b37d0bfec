"""The reference agent protocol over plain HTTP (works with the hosted agent)."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time
import uuid

import aiohttp
import msgspec

from spirit_gpu.log import logger
from spirit_gpu.protocol import agent
from spirit_gpu.protocol.agent import HeartbeatReply, ResultBody, StatusMetric
from spirit_gpu.supervisor.jobs import BadEnvelope, Job, job_from_envelope
from spirit_gpu.supervisor.transports.base import PullResult

LONG_POLL_MS = 20_000
_json = msgspec.json.Encoder()
_reply = msgspec.json.Decoder(HeartbeatReply)


class AgentUnavailable(Exception):
    """The agent could not be reached or answered with an error."""


class Outage:
    """Logs an agent outage once when it starts and once when it ends."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.since: float | None = None

    def down(self, error: object) -> None:
        if self.since is None:
            self.since = time.monotonic()
            logger.error(f"{self.what} unreachable ({error}); retrying with backoff")

    def up(self) -> None:
        if self.since is not None:
            logger.info(f"{self.what} reachable again after "
                        f"{time.monotonic() - self.since:.1f} s")
            self.since = None


class PlainTransport:
    def __init__(self, session: aiohttp.ClientSession, agent_url: str, token: str = "") -> None:
        self.session = session
        self.agent_url = agent_url
        # the worker id lets our gateway tell workers on one host apart (leases, counts);
        # the reference agent ignores it
        self.headers = {agent.WORKER_ID_HEADER: f"{socket.gethostname()}-{os.getpid()}-"
                                            f"{uuid.uuid4().hex[:8]}"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.features: set[str] = set()
        self.outage = Outage(f"agent at {agent_url}")

    def _note(self, resp: aiohttp.ClientResponse) -> None:
        offered = resp.headers.get(agent.FEATURES_HEADER)
        if offered is not None:
            self.features = agent.parse_features(offered)

    async def pull(self, limit: int) -> PullResult:
        long_poll = "longpoll" in self.features
        params = {"wait": str(LONG_POLL_MS)} if long_poll else None
        timeout = aiohttp.ClientTimeout(total=LONG_POLL_MS / 1000 + 15 if long_poll else 30)
        try:
            async with self.session.get(agent.endpoint(self.agent_url, agent.REQUEST),
                                        params=params, headers=self.headers,
                                        timeout=timeout) as resp:
                self._note(resp)
                healthy = resp.headers.get(agent.HEALTH_HEADER, "").strip().lower() != "false"
                if resp.status == 404:
                    self.outage.up()
                    return PullResult([], healthy)
                if resp.status != 200:
                    self.outage.down(f"GET request answered {resp.status}")
                    raise AgentUnavailable(f"GET request answered {resp.status}")
                raw = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.outage.down(exc)
            raise AgentUnavailable(str(exc)) from exc
        self.outage.up()
        try:
            return PullResult([job_from_envelope(raw)], healthy)
        except BadEnvelope as exc:
            logger.error(str(exc))
            return PullResult([], healthy)

    async def _post(self, path: str, body: bytes, request_id: str = "",
                    extra: dict[str, str] | None = None, attempts: int = 6) -> bytes | None:
        headers = dict(self.headers, **{"Content-Type": "application/json"}, **(extra or {}))
        delay = 0.1
        for attempt in range(1, attempts + 1):
            try:
                async with self.session.post(agent.endpoint(self.agent_url, path), data=body,
                                             headers=headers) as resp:
                    self._note(resp)
                    data = await resp.read()
                    if resp.status < 500:
                        self.outage.up()
                        if resp.status >= 400:
                            logger.warn(f"agent answered {resp.status} to {path}: "
                                        f"{data[:200]!r}", request_id=request_id)
                        return data
                    error: object = f"status {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                error = exc
                self.outage.down(exc)
            if attempt < attempts:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        logger.error(f"giving up on POST {path} after {attempts} attempts: {error}",
                     request_id=request_id)
        return None

    async def metric(self, job: Job, status: StatusMetric) -> None:
        await self._post(f"{agent.METRIC}/{job.request_id}", _json.encode(status),
                         job.request_id)

    async def result(self, job: Job, status_code: int, message: str, data: bytes) -> None:
        body = ResultBody(statusCode=status_code, message=message,
                          data=base64.b64encode(data).decode())
        await self._post(f"{agent.RESULT}/{job.request_id}", _json.encode(body), job.request_id,
                         attempts=10)

    async def ack(self, job: Job) -> None:
        await self._post(f"{agent.ACK}/{job.request_id}", b"", job.request_id)

    async def chunk(self, job: Job, seq: int, data: bytes) -> None:
        if "stream" in self.features:
            await self._post(f"{agent.CHUNK}/{job.request_id}", data, job.request_id,
                             {agent.CHUNK_SEQ_HEADER: str(seq)}, attempts=3)

    async def heartbeat(self, request_ids: list[str]) -> HeartbeatReply:
        data = await self._post(agent.HEARTBEAT, _json.encode(agent.Heartbeat(request_ids)),
                                attempts=1)
        if data:
            try:
                return _reply.decode(data)
            except msgspec.DecodeError:
                pass  # the reference agent answers without a body of ours
        return HeartbeatReply()

    async def close(self) -> None:
        return None
