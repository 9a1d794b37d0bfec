"""Golden bytes of every proxy-link frame and every registration body.

The proxy link and the registration extension are spoken by workers and
gateways of different versions: their bytes cannot drift silently.
"""

from __future__ import annotations

import msgspec
import pytest

from spirit_gpu.protocol import proxy as pp

FRAMES: list[tuple[pp.LinkFrame, bytes]] = [
    (pp.LinkOpen(1, "POST", "/v1/x?a=1", [("Content-Type", "application/json")], b"{}",
                 False, "r1"),
     b"\x98\xa4open\x01\xa4POST\xa9/v1/x?a=1\x91\x92\xacContent-Type\xb0application/json"
     b"\xc4\x02{}\xc2\xa2r1"),
    (pp.LinkCancel(2), b"\x92\xa6cancel\x02"),
    (pp.LinkHead(1, 200, "OK", [("X-A", "1")]),
     b"\x95\xa4head\x01\xcc\xc8\xa2OK\x91\x92\xa3X-A\xa11"),
    (pp.LinkData(1, b"tok"), b"\x93\xa4data\x01\xc4\x03tok"),
    (pp.LinkEnd(1), b"\x92\xa3end\x01"),
    (pp.LinkFail(1, "cut"), b"\x93\xa4fail\x01\xa3cut"),
]


@pytest.mark.parametrize(("frame", "wire"), FRAMES, ids=lambda v: type(v).__name__)
def test_frame_bytes(frame: pp.LinkFrame, wire: bytes) -> None:
    message = b"\x91" + wire  # a link message is a list of frames: here, of one
    assert pp.encode_frames([frame]) == message
    assert pp.decode_frames(message) == [frame]


def test_every_link_frame_has_a_golden() -> None:
    assert {type(f) for f, _ in FRAMES} == set(pp.LinkFrame.__args__)  # type: ignore[attr-defined]


def test_frames_of_one_turn_travel_in_one_message() -> None:
    frames: list[pp.LinkFrame] = [pp.LinkData(1, b"a"), pp.LinkEnd(1)]
    assert pp.encode_frames(frames) == b"\x92\x93\xa4data\x01\xc4\x01a\x92\xa3end\x01"
    assert pp.decode_frames(pp.encode_frames(frames)) == frames


@pytest.mark.parametrize("bad", [b"", b"\x91\x92\xa4nope\x01", b"\x91\x91\xa3end", b"\xc1",
                                 b"\x92\xa3end\x01"])
def test_malformed_link_messages_raise(bad: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        pp.decode_frames(bad)


def test_payload_size_counts_bodies_in_open_and_data() -> None:
    assert pp.payload_size(pp.LinkOpen(1, "POST", "/", [], b"12345", False, "")) == 5
    assert pp.payload_size(pp.LinkData(1, b"123")) == 3
    assert pp.payload_size(pp.LinkHead(1, 200, "", [])) == 0


BODIES: list[tuple[msgspec.Struct, bytes]] = [
    (pp.ProxyRegistration(workerID="w1", url="http://10.0.0.5:8001", ready=True, inflight=2,
                          heartbeatInterval=5.0),
     b'{"workerID":"w1","url":"http://10.0.0.5:8001","ready":true,"inflight":2,'
     b'"heartbeatInterval":5.0}'),
    (pp.RegisterReply(workerID="w1", leaseSeconds=20.0, link="/apis/v1/proxy/link"),
     b'{"workerID":"w1","leaseSeconds":20.0,"link":"/apis/v1/proxy/link"}'),
    (pp.ProxyDeregistration(workerID="w1"), b'{"workerID":"w1"}'),
    (pp.ProxyWorkerInfo(workerID="w1", url="http://h:1", ready=True, inflight=1,
                        reportedInflight=0, expiresIn=19.5),
     b'{"workerID":"w1","url":"http://h:1","ready":true,"inflight":1,"reportedInflight":0,'
     b'"expiresIn":19.5}'),
    (pp.ProxyWorkers(workers=[]), b'{"workers":[]}'),
]


@pytest.mark.parametrize(("body", "wire"), BODIES, ids=lambda v: type(v).__name__)
def test_registration_body_bytes(body: msgspec.Struct, wire: bytes) -> None:
    assert msgspec.json.encode(body) == wire
    assert msgspec.json.decode(wire, type=type(body)) == body


def test_every_registration_body_has_a_golden() -> None:
    bodies = {pp.ProxyRegistration, pp.RegisterReply, pp.ProxyDeregistration,
              pp.ProxyWorkerInfo, pp.ProxyWorkers}
    declared = {v for v in vars(pp).values()
                if isinstance(v, type) and issubclass(v, msgspec.Struct)
                and v not in set(pp.LinkFrame.__args__)}  # type: ignore[attr-defined]
    assert declared == bodies
    assert {type(b) for b, _ in BODIES} == bodies


def test_older_registrations_decode_with_defaults() -> None:
    # a worker that sends only what the first version had
    old = b'{"workerID":"w1","url":"http://h:1","ready":false}'
    assert msgspec.json.decode(old, type=pp.ProxyRegistration) == pp.ProxyRegistration(
        workerID="w1", url="http://h:1", ready=False, inflight=0, heartbeatInterval=5.0)
    assert msgspec.json.decode(b'{"workerID":"w1","leaseSeconds":2}',
                               type=pp.RegisterReply).link == ""


def test_names_on_the_wire() -> None:
    assert (pp.FEATURE, pp.REGISTER_PATH, pp.DEREGISTER_PATH, pp.WORKERS_PATH, pp.LINK_PATH) == (
        "proxy", "/apis/v1/proxy/register", "/apis/v1/proxy/deregister",
        "/apis/v1/proxy/workers", "/apis/v1/proxy/link")
    assert (pp.CLIENT_AUTH_HEADER, pp.REQUEST_ID_HEADER, pp.WORKER_TOKEN_HEADER) == (
        "Auth", "Spirit-Request-Id", "Spirit-Worker-Token")
