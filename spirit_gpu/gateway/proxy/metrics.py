"""Prometheus metrics of the proxy route, on the gateway's own registry (``/metrics``).

Counted in plain dicts and turned into metric families only when scraped:
prometheus_client's own metric objects take a lock on every update, which on
the proxy's hot path cost more than the rest of a request's bookkeeping.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from spirit_gpu.gateway.metric_counts import (
    Histograms,
    Labels,
    SidLabels,
    count,
    counter_family,
)

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0, 60.0, 180.0)
_REQUESTS = ("spirit_gateway_proxy_requests", "Proxy requests by answer (HTTP code, or 'cut')")
_IN_FLIGHT = ("spirit_gateway_proxy_in_flight", "Proxy requests being answered")
_START = ("spirit_gateway_proxy_response_start_seconds",
          "Request received to response head from the worker")


class ProxyMetrics(Collector):
    """Answers by code (``cut_*`` for a stream ended early), in flight, time to response head."""

    def __init__(self, registry: CollectorRegistry | None = None, max_sids: int = 1000) -> None:
        self.sid_label = SidLabels(max_sids)  # any key holder can name new ids: bounded
        self.answers: dict[Labels, int] = {}
        self.in_flight: dict[str, int] = {}
        self._starts = Histograms(_BUCKETS)
        (registry if registry is not None else CollectorRegistry()).register(self)

    def begin(self, sid: str) -> None:
        label = self.sid_label(sid)
        self.in_flight[label] = self.in_flight.get(label, 0) + 1

    def end(self, sid: str, code: str) -> None:
        label = self.sid_label(sid)
        self.in_flight[label] -= 1
        count(self.answers, (label, code))

    def response_started(self, sid: str, seconds: float) -> None:
        self._starts.observe((self.sid_label(sid),), seconds)

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(*_REQUESTS, labels=["sid", "code"])
        yield GaugeMetricFamily(*_IN_FLIGHT, labels=["sid"])
        yield self._starts.family(*_START, ["sid"])

    def collect(self) -> Iterator[Metric]:
        yield counter_family(*_REQUESTS, ["sid", "code"], self.answers)
        in_flight = GaugeMetricFamily(*_IN_FLIGHT, labels=["sid"])
        for sid, n in list(self.in_flight.items()):
            in_flight.add_metric([sid], n)
        yield in_flight
        yield self._starts.family(*_START, ["sid"])
