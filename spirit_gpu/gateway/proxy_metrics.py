"""Prometheus metrics of the proxy route, on the gateway's own registry (``/metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0, 60.0, 180.0)


class ProxyMetrics:
    """Answers by code (``cut`` for a stream ended early), in flight, time to response head."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.requests = Counter("spirit_gateway_proxy_requests",
                                "Proxy requests by answer (HTTP code, or 'cut')",
                                ["sid", "code"], registry=r)
        self.in_flight = Gauge("spirit_gateway_proxy_in_flight",
                               "Proxy requests being answered", ["sid"], registry=r)
        self.response_start = Histogram("spirit_gateway_proxy_response_start_seconds",
                                        "Request received to response head from the worker",
                                        ["sid"], buckets=_BUCKETS, registry=r)
