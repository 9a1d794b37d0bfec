"""The proxy route's metrics as Prometheus scrapes them (exact exposition lines)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from spirit_gpu.gateway.proxy.metrics import ProxyMetrics


def test_exposition() -> None:
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry)
    for sid in ("a", "a", "b"):
        metrics.begin(sid)
    metrics.end("a", "200")
    metrics.end("a", "cut_worker_failed")
    for seconds in (0.001, 0.003, 500.0):
        metrics.response_started("a", seconds)
    text = generate_latest(registry).decode()
    for line in (
        "# TYPE spirit_gateway_proxy_requests_total counter",
        'spirit_gateway_proxy_requests_total{code="200",sid="a"} 1.0',
        'spirit_gateway_proxy_requests_total{code="cut_worker_failed",sid="a"} 1.0',
        "# TYPE spirit_gateway_proxy_in_flight gauge",
        'spirit_gateway_proxy_in_flight{sid="a"} 0.0',
        'spirit_gateway_proxy_in_flight{sid="b"} 1.0',
        "# TYPE spirit_gateway_proxy_response_start_seconds histogram",
        'spirit_gateway_proxy_response_start_seconds_bucket{le="0.001",sid="a"} 1.0',
        'spirit_gateway_proxy_response_start_seconds_bucket{le="0.0025",sid="a"} 1.0',
        'spirit_gateway_proxy_response_start_seconds_bucket{le="0.005",sid="a"} 2.0',
        'spirit_gateway_proxy_response_start_seconds_bucket{le="180.0",sid="a"} 2.0',
        'spirit_gateway_proxy_response_start_seconds_bucket{le="+Inf",sid="a"} 3.0',
        'spirit_gateway_proxy_response_start_seconds_count{sid="a"} 3.0',
        'spirit_gateway_proxy_response_start_seconds_sum{sid="a"} 500.004',
    ):
        assert line in text.splitlines(), line


def test_serverless_ids_past_the_limit_share_one_label() -> None:
    # any API key holder can name new serverless ids in the Auth header
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry, max_sids=2)
    for sid in ("a", "b", "c", "d"):
        metrics.begin(sid)
        metrics.end(sid, "503")
    lines = generate_latest(registry).decode().splitlines()
    requests = [line for line in lines if line.startswith("spirit_gateway_proxy_requests_total{")]
    assert sorted(requests) == [
        'spirit_gateway_proxy_requests_total{code="503",sid="_other"} 2.0',
        'spirit_gateway_proxy_requests_total{code="503",sid="a"} 1.0',
        'spirit_gateway_proxy_requests_total{code="503",sid="b"} 1.0',
    ]
    assert 'spirit_gateway_proxy_in_flight{sid="_other"} 0.0' in lines
