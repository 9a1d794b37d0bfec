"""Golden tests: IPC frames and agent-protocol bodies, byte for byte."""

from __future__ import annotations

import base64
import json
import os

import msgspec
import pytest

from spirit_gpu.protocol import ipc
from spirit_gpu.protocol.agent import ResultBody
from spirit_gpu.supervisor.jobs import (
    Job,
    job_from_envelope,
    metric,
    status_metric,
    ttl_expired,
)


def test_ipc_frames_are_length_prefixed_tagged_msgpack() -> None:
    frame = ipc.encode(ipc.Run(7, "r1", "sync", "", b'{"input":1}'))
    assert frame == (b"\x00\x00\x00\x1c\x96\xa3run\x07\xa2r1\xa4sync\xa0\xc4\x0b"
                     b'{"input":1}')
    assert ipc.encode(ipc.Beat(3)) == b"\x00\x00\x00\x07\x92\xa4beat\x03"
    assert ipc.encode(ipc.Done(1, 200, b"[]", "", False)) == (
        b"\x00\x00\x00\x0f\x96\xa4done\x01\xcc\xc8\xc4\x02[]\xa0\xc2")


def test_every_message_round_trips_through_the_frame_buffer() -> None:
    messages: list[ipc.Message] = [
        ipc.Run(1, "a", "async", "http://hook", b"\x00" * 70000), ipc.Cancel(1, 408, "late"),
        ipc.Beat(1), ipc.Stop(), ipc.AskConcurrency(2), ipc.CheckStart(),
        ipc.Hello(10, "sync", 2, {"mode": "handler"}), ipc.Chunk(1, 0, b"1"),
        ipc.Done(1, 500, b"{}", "boom", True), ipc.Concurrency(4),
        ipc.StartChecked(False, "no"), ipc.Fatal("bad import")]
    stream = b"".join(ipc.encode(m) for m in messages)
    buf = ipc.FrameBuffer()
    out: list[ipc.Message] = []
    for i in range(0, len(stream), 1000):  # arbitrary chunking
        out.extend(buf.feed(stream[i:i + 1000]))
    assert out == messages


@pytest.mark.parametrize("step", [1, 3, 17, 1000, 200000])
def test_frames_fed_from_a_reused_read_buffer_do_not_alias_it(step: int) -> None:
    # the child reads into one bytearray and feeds views of it: decoded bodies
    # and held-back tails must survive the buffer being overwritten
    messages: list[ipc.Message] = [ipc.Run(i, f"r{i}", "sync", "", bytes([i]) * (i * 37))
                                   for i in range(1, 40)]
    stream = b"".join(ipc.encode(m) for m in messages)
    scratch = bytearray(step)
    buf = ipc.FrameBuffer()
    out: list[ipc.Message] = []
    for i in range(0, len(stream), step):
        piece = stream[i:i + step]
        scratch[:len(piece)] = piece
        out.extend(buf.feed(memoryview(scratch)[:len(piece)]))
        scratch[:] = b"\xff" * len(scratch)
    assert out == messages


def test_blocking_read_and_write_over_a_real_pipe() -> None:
    r, w = os.pipe()
    ipc.write_all(w, ipc.encode(ipc.Fatal("x")))
    os.close(w)
    assert ipc.read_message(r) == ipc.Fatal("x")
    assert ipc.read_message(r) is None
    os.close(r)


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


def test_metric_and_result_bodies_have_the_reference_fields() -> None:
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
