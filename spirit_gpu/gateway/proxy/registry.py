"""Which proxy workers a gateway can route to, per serverless id.

A worker is routable while it is ready, its lease (renewed by every register
beat) has not run out, and no connection to it has failed since its last
beat. Picking is least in-flight first, ties taken in turn.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web
from yarl import URL

from spirit_gpu.gateway.proxy.link import GatewayLink
from spirit_gpu.log import logger
from spirit_gpu.protocol.proxy import ProxyRegistration, ProxyWorkerInfo

if TYPE_CHECKING:
    from spirit_gpu.gateway.proxy.queued import AnswerRelay


@dataclass(eq=False)
class ProxyWorker:
    sid: str
    worker_id: str
    url: str
    base: URL
    ready: bool
    expires_at: float
    reported_inflight: int = 0
    inflight: int = 0
    failed: bool = False
    link: GatewayLink | None = None  # the worker's proxy link, when it dialled one

    def routable(self, now: float) -> bool:
        return self.ready and not self.failed and now < self.expires_at


@dataclass
class ProxyRegistry:
    lease_seconds: float
    _by_sid: dict[str, dict[str, ProxyWorker]] = field(default_factory=dict)
    _turn: int = 0
    # told of every register beat and deregistration (the NATS store shares them with
    # the other replicas: gateway/storage/nats/proxy_share.py)
    on_register: Callable[[str, ProxyRegistration], None] | None = None
    on_deregister: Callable[[str, str], None] | None = None
    # how an answer to a queued proxy job (proxy/queued.py) posted to this replica reaches
    # the replica whose client waits for it: set by the same ProxyShare, the one object
    # of the proxy route it is handed
    answer_relay: AnswerRelay | None = None

    def register(self, sid: str, reg: ProxyRegistration) -> ProxyWorker:
        now = time.monotonic()
        workers = self._by_sid.setdefault(sid, {})
        worker = workers.get(reg.workerID)
        if worker is None or worker.url != reg.url:
            base = URL(reg.url.rstrip("/"))
            worker = ProxyWorker(sid, reg.workerID, reg.url, base, reg.ready,
                                 now + self.lease_seconds)
            if reg.workerID in workers:
                worker.inflight = workers[reg.workerID].inflight
                worker.link = workers[reg.workerID].link
            workers[reg.workerID] = worker
            logger.info(f"proxy worker {reg.workerID} of {sid} registered at {reg.url} "
                        f"(ready={reg.ready})")
        elif worker.failed or worker.ready != reg.ready:
            logger.info(f"proxy worker {reg.workerID} of {sid} is "
                        f"{'ready' if reg.ready else 'not ready'}")
        worker.ready = reg.ready
        worker.failed = False
        worker.reported_inflight = reg.inflight
        worker.expires_at = now + self.lease_seconds
        self._expire(sid, now)
        if self.on_register is not None:
            self.on_register(sid, reg)
        return worker

    def get(self, sid: str, worker_id: str) -> ProxyWorker | None:
        return self._by_sid.get(sid, {}).get(worker_id)

    def links(self) -> list[GatewayLink]:
        return [w.link for workers in self._by_sid.values() for w in workers.values()
                if w.link is not None]

    def deregister(self, sid: str, worker_id: str) -> bool:
        worker = self._by_sid.get(sid, {}).pop(worker_id, None)
        if worker is not None:
            logger.info(f"proxy worker {worker_id} of {sid} deregistered")
        if self.on_deregister is not None:
            self.on_deregister(sid, worker_id)
        return worker is not None

    def drop(self, worker: ProxyWorker, reason: str) -> None:
        """No more routing to ``worker`` until its next register beat."""
        if not worker.failed:
            worker.failed = True
            logger.warn(f"proxy worker {worker.worker_id} of {worker.sid} dropped from "
                        f"routing: {reason}")

    def pick(self, sid: str, exclude: set[ProxyWorker] | None = None) -> ProxyWorker | None:
        workers = self._by_sid.get(sid)
        if not workers:
            return None
        now = time.monotonic()
        candidates = [w for w in workers.values()
                      if w.routable(now) and (exclude is None or w not in exclude)]
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        self._turn += 1
        start = self._turn % len(candidates)
        ordered = candidates[start:] + candidates[:start]
        return min(ordered, key=lambda w: w.inflight)

    def workers(self, sid: str) -> list[ProxyWorkerInfo]:
        now = time.monotonic()
        self._expire(sid, now)
        return [ProxyWorkerInfo(workerID=w.worker_id, url=w.url, ready=w.routable(now),
                                inflight=w.inflight, reportedInflight=w.reported_inflight,
                                expiresIn=round(w.expires_at - now, 3))
                for w in self._by_sid.get(sid, {}).values()]

    def _expire(self, sid: str, now: float) -> None:
        workers = self._by_sid.get(sid, {})
        for worker_id, worker in list(workers.items()):
            if now >= worker.expires_at + self.lease_seconds:  # long gone: forget it
                del workers[worker_id]
                logger.info(f"proxy worker {worker_id} of {sid} forgotten (lease expired)")


REGISTRY_KEY: web.AppKey[ProxyRegistry] = web.AppKey("spirit_proxy_registry", ProxyRegistry)
"""Where the proxy route puts its registry (``route.install``)."""
