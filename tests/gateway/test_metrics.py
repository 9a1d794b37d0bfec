"""The gateway's request metrics as Prometheus scrapes them (exact exposition lines)."""

from __future__ import annotations

from prometheus_client import generate_latest

from spirit_gpu.gateway.metrics import GatewayMetrics
from spirit_gpu.gateway.storage.base import RequestRecord


def _finished(sid: str, status: str, created: int, started: int, finished: int) -> RequestRecord:
    rec = RequestRecord(request_id=f"{sid}-{created}", sid=sid, mode="sync", sequence=1,
                        body=b"", webhook="", created_at=created, enqueued_at=created,
                        ttl_ms=60_000)
    rec.status, rec.started_at, rec.finished_at = status, started, finished
    return rec


def test_exposition() -> None:
    metrics = GatewayMetrics()
    for sid in ("a", "a", "b"):
        metrics.on_accept(sid, "sync")
    metrics.on_finish(_finished("a", "succeed", 1000, 1001, 1010))  # 10 ms: on a bound
    metrics.on_finish(_finished("a", "failed", 2000, 0, 2700))  # never started
    text = generate_latest(metrics.registry).decode()
    for line in (
        'spirit_gateway_requests_accepted_total{mode="sync",sid="a"} 2.0',
        'spirit_gateway_requests_accepted_total{mode="sync",sid="b"} 1.0',
        'spirit_gateway_requests_finished_total{mode="sync",sid="a",status="succeed"} 1.0',
        'spirit_gateway_requests_finished_total{mode="sync",sid="a",status="failed"} 1.0',
        'spirit_gateway_request_duration_seconds_bucket{le="0.005",mode="sync",sid="a"} 0.0',
        'spirit_gateway_request_duration_seconds_bucket{le="0.01",mode="sync",sid="a"} 1.0',
        'spirit_gateway_request_duration_seconds_bucket{le="0.5",mode="sync",sid="a"} 1.0',
        'spirit_gateway_request_duration_seconds_bucket{le="1.0",mode="sync",sid="a"} 2.0',
        'spirit_gateway_request_duration_seconds_bucket{le="+Inf",mode="sync",sid="a"} 2.0',
        'spirit_gateway_request_duration_seconds_count{mode="sync",sid="a"} 2.0',
        'spirit_gateway_request_duration_seconds_sum{mode="sync",sid="a"} 0.71',
        'spirit_gateway_queueing_seconds_count{sid="a"} 1.0',
        'spirit_gateway_queueing_seconds_bucket{le="0.001",sid="a"} 1.0',
        '# TYPE spirit_gateway_requests_accepted_total counter',
        '# TYPE spirit_gateway_request_duration_seconds histogram',
    ):
        assert line in text.splitlines(), (line, text)
