"""Prometheus metrics of one gateway (its own registry, so many apps can coexist)."""

from __future__ import annotations

from typing import Any, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from spirit_gpu.gateway.storage.base import RequestRecord, Storage

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0, 60.0, 180.0, 600.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST
M = TypeVar("M", Counter, Histogram, Gauge)


class _Children:
    """``metric.labels(...)`` costs a lock and a tuple build per call: keep the children."""

    def __init__(self) -> None:
        self._cache: dict[tuple[Any, ...], Any] = {}

    def __call__(self, metric: M, *labels: str) -> M:
        key = (id(metric), *labels)
        child = self._cache.get(key)
        if child is None:
            child = self._cache[key] = metric.labels(*labels)
        return child  # type: ignore[no-any-return]


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._of = _Children()
        r = self.registry
        self.accepted = Counter("spirit_gateway_requests_accepted", "Requests accepted",
                                ["sid", "mode"], registry=r)
        self.finished = Counter("spirit_gateway_requests_finished",
                                "Requests that reached a terminal status",
                                ["sid", "mode", "status"], registry=r)
        self.latency = Histogram("spirit_gateway_request_duration_seconds",
                                 "Accepted to terminal", ["sid", "mode"], buckets=_BUCKETS,
                                 registry=r)
        self.queueing = Histogram("spirit_gateway_queueing_seconds",
                                  "Accepted to started on a worker", ["sid"],
                                  buckets=_BUCKETS, registry=r)
        self.queue_length = Gauge("spirit_gateway_queue_length", "Requests waiting for a worker",
                                  ["sid"], registry=r)
        self.in_flight = Gauge("spirit_gateway_in_flight", "Requests handed to workers",
                               ["sid"], registry=r)
        self.workers = Gauge("spirit_gateway_workers", "Workers seen within the lease",
                             ["sid"], registry=r)

    def on_accept(self, sid: str, mode: str) -> None:
        self._of(self.accepted, sid, mode).inc()

    def on_finish(self, rec: RequestRecord) -> None:
        of = self._of
        of(self.finished, rec.sid, rec.mode, rec.status).inc()
        of(self.latency, rec.sid, rec.mode).observe(
            max(0, rec.finished_at - rec.created_at) / 1000)
        if rec.started_at:
            of(self.queueing, rec.sid).observe(max(0, rec.started_at - rec.enqueued_at) / 1000)

    async def render(self, storage: Storage) -> bytes:
        for s in await storage.stats():
            self.queue_length.labels(s.sid).set(s.queued)
            self.in_flight.labels(s.sid).set(s.in_flight)
            self.workers.labels(s.sid).set(s.workers)
        return generate_latest(self.registry)
