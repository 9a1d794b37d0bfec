"""Prometheus metrics of one gateway (its own registry, so many apps can coexist)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from spirit_gpu.gateway.metric_counts import (
    Histograms,
    Labels,
    SidLabels,
    count,
    counter_family,
)
from spirit_gpu.gateway.storage.base import RequestRecord, Storage

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0, 60.0, 180.0, 600.0)
_ACCEPTED = ("spirit_gateway_requests_accepted", "Requests accepted")
_FINISHED = ("spirit_gateway_requests_finished", "Requests that reached a terminal status")
_LATENCY = ("spirit_gateway_request_duration_seconds", "Accepted to terminal")
_QUEUEING = ("spirit_gateway_queueing_seconds", "Accepted to started on a worker")

CONTENT_TYPE = CONTENT_TYPE_LATEST


class GatewayMetrics(Collector):
    """Requests accepted and finished, their latency and queueing (counted per request),
    and queue length, in flight and workers per serverless id (read when scraped)."""

    def __init__(self, max_sids: int = 1000) -> None:
        self.sid_label = SidLabels(max_sids)
        self.registry = CollectorRegistry()
        r = self.registry
        self.accepted: dict[Labels, int] = {}
        self.finished: dict[Labels, int] = {}
        self.latency = Histograms(_BUCKETS)
        self.queueing = Histograms(_BUCKETS)
        r.register(self)
        self.queue_length = Gauge("spirit_gateway_queue_length", "Requests waiting for a worker",
                                  ["sid"], registry=r)
        self.in_flight = Gauge("spirit_gateway_in_flight", "Requests handed to workers",
                               ["sid"], registry=r)
        self.workers = Gauge("spirit_gateway_workers", "Workers seen within the lease",
                             ["sid"], registry=r)

    def on_accept(self, sid: str, mode: str) -> None:
        count(self.accepted, (self.sid_label(sid), mode))

    def on_finish(self, rec: RequestRecord) -> None:
        sid = self.sid_label(rec.sid)
        count(self.finished, (sid, rec.mode, rec.status))
        self.latency.observe((sid, rec.mode), max(0, rec.finished_at - rec.created_at) / 1000)
        if rec.started_at:
            self.queueing.observe((sid,), max(0, rec.started_at - rec.enqueued_at) / 1000)

    def describe(self) -> Iterator[Metric]:
        return self.collect()  # the names, for the registry's duplicate check

    def collect(self) -> Iterator[Metric]:
        yield counter_family(*_ACCEPTED, ["sid", "mode"], self.accepted)
        yield counter_family(*_FINISHED, ["sid", "mode", "status"], self.finished)
        yield self.latency.family(*_LATENCY, ["sid", "mode"])
        yield self.queueing.family(*_QUEUEING, ["sid"])

    async def render(self, storage: Storage) -> bytes:
        totals: dict[str, list[int]] = {}
        for s in await storage.stats():
            row = totals.setdefault(self.sid_label(s.sid), [0, 0, 0])
            row[0] += s.queued
            row[1] += s.in_flight
            row[2] += s.workers
        for sid, (queued, in_flight, workers) in totals.items():
            self.queue_length.labels(sid).set(queued)
            self.in_flight.labels(sid).set(in_flight)
            self.workers.labels(sid).set(workers)
        return generate_latest(self.registry)
