"""Prometheus metrics of the proxy route, on the gateway's own registry (``/metrics``).

Counted in plain dicts and turned into metric families only when scraped:
prometheus_client's own metric objects take a lock on every update, which on
the proxy's hot path cost more than the rest of a request's bookkeeping.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0, 60.0, 180.0)
_LE = (*(repr(bound) for bound in _BUCKETS), "+Inf")  # as prometheus_client writes them
_REQUESTS = ("spirit_gateway_proxy_requests", "Proxy requests by answer (HTTP code, or 'cut')")
_IN_FLIGHT = ("spirit_gateway_proxy_in_flight", "Proxy requests being answered")
_START = ("spirit_gateway_proxy_response_start_seconds",
          "Request received to response head from the worker")


class _Histogram:
    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(_BUCKETS) + 1)  # the last one: above every bound (+Inf)
        self.total = 0.0


class ProxyMetrics(Collector):
    """Answers by code (``cut_*`` for a stream ended early), in flight, time to response head."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.answers: dict[tuple[str, str], int] = {}
        self.in_flight: dict[str, int] = {}
        self._starts: dict[str, _Histogram] = {}
        (registry if registry is not None else CollectorRegistry()).register(self)

    def begin(self, sid: str) -> None:
        self.in_flight[sid] = self.in_flight.get(sid, 0) + 1

    def end(self, sid: str, code: str) -> None:
        self.in_flight[sid] -= 1
        key = (sid, code)
        self.answers[key] = self.answers.get(key, 0) + 1

    def response_started(self, sid: str, seconds: float) -> None:
        hist = self._starts.get(sid)
        if hist is None:
            hist = self._starts[sid] = _Histogram()
        hist.counts[bisect_left(_BUCKETS, seconds)] += 1  # le: a bound counts as inside
        hist.total += seconds

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(*_REQUESTS, labels=["sid", "code"])
        yield GaugeMetricFamily(*_IN_FLIGHT, labels=["sid"])
        yield HistogramMetricFamily(*_START, labels=["sid"])

    def collect(self) -> Iterator[Metric]:
        answers = CounterMetricFamily(*_REQUESTS, labels=["sid", "code"])
        for (sid, code), n in list(self.answers.items()):
            answers.add_metric([sid, code], n)
        in_flight = GaugeMetricFamily(*_IN_FLIGHT, labels=["sid"])
        for sid, n in list(self.in_flight.items()):
            in_flight.add_metric([sid], n)
        starts = HistogramMetricFamily(*_START, labels=["sid"])
        for sid, hist in list(self._starts.items()):
            cumulative, buckets = 0, []
            for le, n in zip(_LE, hist.counts, strict=True):
                cumulative += n
                buckets.append((le, cumulative))
            starts.add_metric([sid], buckets, hist.total)
        yield answers
        yield in_flight
        yield starts
