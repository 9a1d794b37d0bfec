"""The reference agent protocol over plain HTTP (works with the hosted agent)."""

from __future__ import annotations

import base64
import os
import socket
import uuid
from collections.abc import Callable

import aiohttp
import msgspec

from spirit_gpu.log import logger
from spirit_gpu.net.outage import Outage
from spirit_gpu.protocol import agent
from spirit_gpu.protocol.agent import HeartbeatReply, ResultBody
from spirit_gpu.retry import RetryPolicy
from spirit_gpu.supervisor.jobs import (
    BadEnvelope,
    Job,
    StatusReport,
    job_from_envelope,
    status_metric,
)
from spirit_gpu.supervisor.transports.base import (
    AgentUnavailable,
    Capabilities,
    PullResult,
)

LONG_POLL_MS = 20_000
_json = msgspec.json.Encoder()
_reply = msgspec.json.Decoder(HeartbeatReply)
# a POST the agent did not take (no answer, 5xx) is retried: a result and a stream chunk
# longest (a gateway restarting takes seconds, and a stream missing a chunk is a wrong
# stream), a heartbeat not at all (the next one comes soon). Once a chunk of a job is
# given up, the job's later chunks get one try: its result does not wait behind them.
REPORT_RETRY = RetryPolicy(first=0.1, factor=2.0, max_delay=5.0, attempts=6)
RESULT_RETRY = RetryPolicy(first=0.1, factor=2.0, max_delay=5.0, attempts=10)
CHUNK_RETRY = RESULT_RETRY
CHUNK_AFTER_LOSS_RETRY = RetryPolicy(first=0.1, attempts=1)
HEARTBEAT_RETRY = RetryPolicy(first=0.1, attempts=1)


class PlainTransport:
    capabilities = Capabilities(batched_pulls=False, instant_metrics=False)

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
        # answered, but not with a job: reachable (a heartbeat's answer must not read as
        # "reachable again" between two refused pulls), so logged in words of its own
        self.refusal = Outage(f"agent at {agent_url}", "refuses this worker's pulls",
                              "takes this worker's pulls again")
        self._chunk_lost: set[str] = set()  # jobs a chunk of which was given up
        self.answered = False  # the agent has answered a call (with any status)

    def _note(self, resp: aiohttp.ClientResponse) -> None:
        self.answered = True
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
                    self.refusal.up()
                    return PullResult([], healthy)
                if 400 <= resp.status < 500:
                    self.outage.up()
                    why = (await resp.read())[:200].decode(errors="replace")
                    self.refusal.down(f"GET request answered {resp.status}: {why}")
                    raise AgentUnavailable(f"GET request answered {resp.status}")
                if resp.status != 200:
                    self.outage.down(f"GET request answered {resp.status}")
                    raise AgentUnavailable(f"GET request answered {resp.status}")
                raw = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.outage.down(exc)
            raise AgentUnavailable(str(exc)) from exc
        self.outage.up()
        self.refusal.up()
        try:
            return PullResult([job_from_envelope(raw)], healthy)
        except BadEnvelope as exc:
            logger.error(str(exc))
            return PullResult([], healthy)

    async def _post(self, path: str, body: bytes, request_id: str = "",
                    extra: dict[str, str] | None = None,
                    retry: RetryPolicy = REPORT_RETRY) -> bytes | None:
        outage = self.outage
        headers = dict(self.headers, **{"Content-Type": "application/json"}, **(extra or {}))
        error: object = ""
        async for _ in retry.attempts_of():
            try:
                async with self.session.post(agent.endpoint(self.agent_url, path), data=body,
                                             headers=headers) as resp:
                    self._note(resp)
                    data = await resp.read()
                    if resp.status < 500:
                        outage.up()
                        if resp.status >= 400:
                            logger.warn(f"agent answered {resp.status} to {path}: "
                                        f"{data[:200]!r}", request_id=request_id)
                        return data
                    error = f"status {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                error = exc
                outage.down(exc)
        if request_id:  # a job's report is lost: say so for each one
            logger.error(f"giving up on POST {path} after {retry.attempts} attempts: {error}",
                         request_id=request_id)
        else:  # a heartbeat: the outage is logged once when it starts and when it ends
            outage.down(f"POST {path}: {error}")
        return None

    async def metric(self, job: Job, report: StatusReport) -> None:
        await self._post(f"{agent.METRIC}/{job.request_id}",
                         _json.encode(status_metric(job, report)), job.request_id)

    async def result(self, job: Job, status_code: int, message: str, data: bytes) -> None:
        self._chunk_lost.discard(job.request_id)
        body = ResultBody(statusCode=status_code, message=message,
                          data=base64.b64encode(data).decode())
        await self._post(f"{agent.RESULT}/{job.request_id}", _json.encode(body), job.request_id,
                         retry=RESULT_RETRY)

    async def ack(self, job: Job) -> None:
        await self._post(f"{agent.ACK}/{job.request_id}", b"", job.request_id)

    async def chunk(self, job: Job, seq: int, data: bytes) -> None:
        if "stream" in self.features:
            lost = job.request_id in self._chunk_lost
            if await self._post(f"{agent.CHUNK}/{job.request_id}", data, job.request_id,
                                {agent.CHUNK_SEQ_HEADER: str(seq)},
                                CHUNK_AFTER_LOSS_RETRY if lost else CHUNK_RETRY) is None:
                self._chunk_lost.add(job.request_id)

    async def heartbeat(self, request_ids: list[str]) -> HeartbeatReply:
        data = await self._post(agent.HEARTBEAT, _json.encode(agent.Heartbeat(request_ids)),
                                retry=HEARTBEAT_RETRY)
        if data is None:
            raise AgentUnavailable("heartbeat not delivered")
        if data:
            try:
                return _reply.decode(data)
            except msgspec.DecodeError:
                pass  # the reference agent answers without a body of ours
        return HeartbeatReply()

    def on_cancel(self, cancel: Callable[[str], bool]) -> None:
        return None  # the reference agent names cancels in heartbeat replies only

    async def close(self) -> None:
        return None
