"""Keeping the agent informed of a proxy worker: registration or plain heartbeat.

Each beat is a ``register`` upsert (listener URL, readiness, in-flight count)
when the agent offers the ``proxy`` extension; an agent that answers 404 or
does not name ``proxy`` in ``Spirit-Agent-Features`` gets the reference
heartbeat ``{"requestIDs": [...]}`` instead, and is asked again whenever one
of its answers starts naming the extension.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from typing import Literal

import aiohttp
import msgspec

from spirit_gpu.config import WorkerConfig
from spirit_gpu.log import logger
from spirit_gpu.protocol import agent
from spirit_gpu.protocol.agent import FEATURES_HEADER, has_feature, join_url
from spirit_gpu.protocol.proxy import (
    DEREGISTER_PATH,
    FEATURE,
    REGISTER_PATH,
    ProxyDeregistration,
    ProxyRegistration,
    RegisterReply,
)
from spirit_gpu.supervisor.proxy.listener import ProxyListener

Mode = Literal["unknown", "proxy", "plain"]
_NOT_OFFERED = frozenset({404, 405, 501})
_REFUSED = frozenset({401, 403})
# A refused worker token is logged at every try, the tries backing off up to this
# (seconds): the gateway may yet accept it (a token rotated on its side), and the
# LLM server the worker fronts may have taken minutes to load, so it does not exit.
MAX_REFUSED_INTERVAL = 30.0
_encode = msgspec.json.encode


class Registrar:
    """Beats every ``heartbeat_interval`` (sooner after ``poke()``) until cancelled."""

    def __init__(self, cfg: WorkerConfig, listener: ProxyListener) -> None:
        self.cfg = cfg
        self.listener = listener
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.mode: Mode = "unknown"
        self.lease: float | None = None
        self.beats = 0
        self.refusals = 0  # agent answers 401/403 in a row
        self.link_path = ""  # the proxy link's path when the agent offers one
        self.link_offered = asyncio.Event()
        self._wake = asyncio.Event()
        self._last_problem = ""
        self._headers = {"Content-Type": "application/json"}
        if cfg.worker_token:
            self._headers["Authorization"] = f"Bearer {cfg.worker_token}"
        self._session: aiohttp.ClientSession | None = None

    def poke(self) -> None:
        """Beat now (readiness changed)."""
        self._wake.set()

    @property
    def interval(self) -> float:
        interval = max(0.05, self.cfg.heartbeat_interval)
        if self.lease is not None:
            interval = min(interval, self.lease / 3)
        if self.refusals:
            interval = min(MAX_REFUSED_INTERVAL, interval * 2 ** min(self.refusals, 16))
        return interval

    def _registration(self) -> ProxyRegistration:
        return ProxyRegistration(
            workerID=self.worker_id, url=self.listener.url, ready=self.listener.ready,
            inflight=len(self.listener.stats.inflight),
            heartbeatInterval=self.cfg.heartbeat_interval)

    async def run(self) -> None:
        while True:
            self._wake.clear()
            await self.beat()
            try:
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _post(self, path: str, body: bytes, seconds: float = 10.0) -> tuple[int, str, bytes]:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        url = join_url(self.cfg.agent_url, path)
        limit = aiohttp.ClientTimeout(total=seconds)
        async with self._session.post(url, data=body, headers=self._headers,
                                      timeout=limit) as resp:
            return resp.status, resp.headers.get(FEATURES_HEADER, ""), await resp.read()

    def _refused(self, what: str, status: int, body: bytes) -> None:
        """Say so at every try: a refused worker serves nothing until the token is fixed."""
        self.refusals += 1
        text = body.decode(errors="replace")[:200]
        logger.error(f"{what} refused by the agent {self.cfg.agent_url}: HTTP {status} {text}; "
                     "no request reaches this worker until the agent accepts its worker "
                     "token (SPIRIT_WORKER_TOKEN must be the gateway's --worker-token); "
                     f"refusal {self.refusals}, next try in {self.interval:g}s")
        self._last_problem = f"refused {status}"

    def _problem(self, text: str) -> None:
        """Log an agent problem once until it changes (no log flood every beat)."""
        if text != self._last_problem:
            logger.warn(text)
            self._last_problem = text

    async def beat(self) -> None:
        try:
            if self.mode != "plain":
                await self._register()
            if self.mode == "plain":
                await self._plain_heartbeat()
            self.beats += 1
        except (aiohttp.ClientError, OSError) as exc:
            self._problem(f"agent {self.cfg.agent_url} unreachable: {exc!r}; retrying")

    async def _register(self) -> None:
        status, features, body = await self._post(REGISTER_PATH, _encode(self._registration()))
        if 200 <= status < 300 and has_feature(features, FEATURE):
            reply = msgspec.json.decode(body, type=RegisterReply)
            if self.mode != "proxy" or self._last_problem:
                logger.info(f"registered as proxy worker {self.worker_id} at "
                            f"{self.listener.url} (ready={self.listener.ready}, "
                            f"lease {reply.leaseSeconds:g}s)")
            self.mode, self.lease, self._last_problem = "proxy", reply.leaseSeconds, ""
            self.refusals = 0
            if reply.link and self.cfg.transport != "plain":
                self.link_path = reply.link
                self.link_offered.set()
        elif status in _NOT_OFFERED or 200 <= status < 300:
            logger.info(f"the agent does not offer proxy registration (HTTP {status}); "
                        "using the plain heartbeat")
            self.mode, self.lease = "plain", None
            self.link_offered.clear()
        elif status in _REFUSED:
            self._refused("proxy registration", status, body)
        else:
            text = body.decode(errors="replace")[:200]
            self._problem(f"proxy registration refused: HTTP {status} {text}")

    async def _plain_heartbeat(self) -> None:
        body = _encode(agent.Heartbeat(requestIDs=list(self.listener.stats.inflight.values())))
        status, features, answer = await self._post(agent.API_PREFIX + "/" + agent.HEARTBEAT,
                                                    body)
        if has_feature(features, FEATURE):
            self.mode = "unknown"
            self.poke()
        elif status in _REFUSED:
            self._refused("heartbeat", status, answer)
        elif status >= 300:
            self._problem(f"heartbeat answered HTTP {status}")
        else:
            self._last_problem = ""
            self.refusals = 0

    async def deregister(self) -> None:
        """Tell the agent to route nothing more here (best effort, short)."""
        if self.mode != "proxy":
            return
        try:
            status, _, _ = await self._post(
                DEREGISTER_PATH, _encode(ProxyDeregistration(workerID=self.worker_id)),
                seconds=2.0)
            logger.info(f"deregistered proxy worker {self.worker_id} (HTTP {status})")
        except (aiohttp.ClientError, OSError) as exc:
            logger.warn(f"could not deregister proxy worker {self.worker_id}: {exc!r}")
