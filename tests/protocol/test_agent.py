"""Golden tests of the plain agent protocol (DESIGN.md 5, 5a): every body, byte for byte.

These are the bytes the hosted platform's agent and the original worker
exchange; a change here breaks compatibility with them.
"""

from __future__ import annotations

import base64
import inspect
import json

import msgspec
import pytest

from spirit_gpu.protocol import agent
from spirit_gpu.protocol.agent import (
    Envelope,
    Heartbeat,
    HeartbeatReply,
    ProxyJob,
    ResultBody,
    StatusMetric,
)
from spirit_gpu.supervisor.jobs import Job, job_from_envelope, metric, status_metric, ttl_expired

GOLDEN: list[tuple[msgspec.Struct, bytes]] = [
    (Envelope(headers={"Ease-Mode": "sync", "Ease-Request-Id": "r1"}, body="e30="),
     b'{"headers":{"Ease-Mode":"sync","Ease-Request-Id":"r1"},"body":"e30="}'),
    (StatusMetric(timestamp=2000, requestID="r1", webhook="http://h", status="succeed",
                  operation="async", enqueueTimestamp=1000, queueingDuration=500,
                  executionDuration=500, totalDuration=1000, requestCreateAt=900, message=""),
     b'{"timestamp":2000,"requestID":"r1","webhook":"http://h","status":"succeed",'
     b'"operation":"async","enqueueTimestamp":1000,"queueingDuration":500,'
     b'"executionDuration":500,"totalDuration":1000,"requestCreateAt":900,"message":""}'),
    (ResultBody(statusCode=200, message="", data="e30="),
     b'{"statusCode":200,"message":"","data":"e30="}'),
    (Heartbeat(requestIDs=["r1", "r2"]), b'{"requestIDs":["r1","r2"]}'),
    (HeartbeatReply(cancel=["r1"]), b'{"cancel":["r1"]}'),
    (ProxyJob(method="POST", uri="/v1/chat/completions",
              header={"Content-Type": ["application/json"]}, body="e30="),
     b'{"method":"POST","uri":"/v1/chat/completions",'
     b'"header":{"Content-Type":["application/json"]},"body":"e30="}'),
]


@pytest.mark.parametrize(("body", "wire"), GOLDEN, ids=lambda v: type(v).__name__)
def test_body_bytes(body: msgspec.Struct, wire: bytes) -> None:
    assert msgspec.json.encode(body) == wire
    assert msgspec.json.decode(wire, type=type(body)) == body


def test_every_body_has_a_golden_entry() -> None:
    structs = {obj for _, obj in inspect.getmembers(agent, inspect.isclass)
               if issubclass(obj, msgspec.Struct) and obj.__module__ == agent.__name__}
    assert {type(b) for b, _ in GOLDEN} == structs


def test_paths_and_headers_are_the_reference_names() -> None:
    base = "http://gw:8000/agent/sid-1/"
    assert agent.endpoint(base, agent.REQUEST) == "http://gw:8000/agent/sid-1/apis/v1/request"
    assert agent.endpoint("http://localhost:8087", f"{agent.METRIC}/r1") == (
        "http://localhost:8087/apis/v1/request-metric/r1")
    assert [agent.RESULT, agent.ACK, agent.CHUNK, agent.PROXY_ANSWER, agent.HEARTBEAT] == [
        "request-result", "request-ack", "request-chunk", "request-proxy", "heartbeat"]
    assert agent.DEFAULT_AGENT_URL == "http://localhost:8087"
    assert agent.parse_features(" longpoll, Stream,,link") == {"longpoll", "stream", "link"}
    assert agent.has_feature("proxy,link", "proxy") and not agent.has_feature(None, "proxy")


def test_a_partial_metric_from_another_worker_still_decodes() -> None:
    # an agent reads what it needs; the original worker always sends every field
    m = msgspec.json.decode(b'{"status":"failed","message":"boom"}', type=StatusMetric)
    assert (m.status, m.message, m.requestID) == ("failed", "boom", "")


def test_proxy_job_fields_are_optional_as_in_the_reference() -> None:
    job = msgspec.json.decode(b'{"method":"GET","uri":"/api/tags"}', type=ProxyJob)
    assert (job.header, job.body) == ({}, "")


def test_envelope_headers_take_first_value_and_async_webhook_from_body() -> None:
    body = json.dumps({"input": {}, "webhook": "http://body-hook"}).encode()
    raw = json.dumps({"headers": {"Ease-Mode": "async,async", "Ease-Request-Id": "id1, id1",
                                  "Ease-Webhook": "http://header-hook",
                                  "Ease-Enqueue-At": "1000", "Ease-Create-At": "900",
                                  "Ease-Time-To-Live": "5000"},
                      "body": base64.b64encode(body).decode()}).encode()
    job = job_from_envelope(raw)
    assert (job.request_id, job.mode, job.webhook) == ("id1", "async", "http://body-hook")
    assert (job.enqueue_at, job.create_at, job.ttl_ms, job.body) == (1000, 900, 5000, body)
    assert ttl_expired(job, 6001) and not ttl_expired(job, 6000)


def test_sync_webhook_comes_from_header_and_ttl_defaults() -> None:
    raw = json.dumps({"headers": {"Ease-Request-Id": "x", "Ease-Webhook": "http://h"},
                      "body": base64.b64encode(b'{"input": 1}').decode()}).encode()
    job = job_from_envelope(raw)
    assert (job.mode, job.webhook, job.ttl_ms) == ("sync", "http://h", 600000)


def test_metric_fields_are_in_the_reference_order() -> None:
    job = Job(request_id="r", mode="async", webhook="w", enqueue_at=1000, create_at=900,
              started_at=1500)
    report = metric(job, "succeed", "ok", finished_at=2000)
    m = json.loads(msgspec.json.encode(status_metric(job, report)))
    assert list(m) == ["timestamp", "requestID", "webhook", "status", "operation",
                       "enqueueTimestamp", "queueingDuration", "executionDuration",
                       "totalDuration", "requestCreateAt", "message"]
    assert (m["queueingDuration"], m["executionDuration"], m["totalDuration"]) == (500, 500,
                                                                                   1000)
    assert (m["requestCreateAt"], m["operation"], m["status"]) == (900, "async", "succeed")
    body = msgspec.json.encode(ResultBody(statusCode=200, message="", data="e30="))
    assert body == b'{"statusCode":200,"message":"","data":"e30="}'
