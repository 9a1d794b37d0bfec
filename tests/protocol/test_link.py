"""Golden bytes of every link frame: the wire format cannot drift silently."""

from __future__ import annotations

import msgspec
import pytest

from spirit_gpu.protocol import link as lp

GOLDEN: list[tuple[lp.Frame, bytes]] = [
    (lp.Welcome(1, 20000, ["longpoll", "link", "stored"], 11534336),
     b"\x95\xa7welcome\x01\xcdN \x93\xa8longpoll\xa4link\xa6stored\xce\x00\xb0\x00\x00"),
    (lp.Dispatch("r1", "sync", "http://h/w", 1700000000000, 1700000000001, 180000,
                 b'{"input":1}'),
     b"\x98\xa8dispatch\xa2r1\xa4sync\xaahttp://h/w\xcf\x00\x00\x01\x8b\xcf\xe5h\x00"
     b"\xcf\x00\x00\x01\x8b\xcf\xe5h\x01\xce\x00\x02\xbf \xc4\x0b{\"input\":1}"),
    (lp.Cancel(["r1", "r2"]), b"\x92\xa6cancel\x92\xa2r1\xa2r2"),
    (lp.Credit(-3), b"\x92\xa6credit\xfd"),
    (lp.Metric("r1", "executing", "", 5, 0), b"\x96\xa6metric\xa2r1\xa9executing\xa0\x05\x00"),
    (lp.Result("r1", 200, "", b'{"ok":true}'),
     b"\x95\xa6result\xa2r1\xcc\xc8\xa0\xc4\x0b{\"ok\":true}"),
    (lp.Ack("r1"), b"\x92\xa3ack\xa2r1"),
    (lp.Chunk("r1", 0, b'{"i":0}'), b"\x94\xa5chunk\xa2r1\x00\xc4\x07{\"i\":0}"),
    (lp.Heartbeat(["r1"]), b"\x92\xa9heartbeat\x91\xa2r1"),
    (lp.Stored(70000), b"\x92\xa6stored\xce\x00\x01\x11p"),
]


@pytest.mark.parametrize(("frame", "wire"), GOLDEN, ids=lambda v: type(v).__name__)
def test_frame_bytes(frame: lp.Frame, wire: bytes) -> None:
    assert lp.encode(frame) == wire
    assert lp.decode(wire) == frame


def test_every_frame_has_a_golden() -> None:
    assert {type(f) for f, _ in GOLDEN} == set(lp.Frame.__args__)  # type: ignore[attr-defined]


def test_payloads_are_raw_bytes_and_old_frames_still_decode() -> None:
    # a frame from an older peer without trailing optional fields decodes with defaults
    assert lp.decode(b"\x94\xa6metric\xa2r1\xa9executing\xa0") == lp.Metric("r1", "executing")
    assert lp.decode(b"\x93\xa7welcome\x01\x00") == lp.Welcome(1, 0, [])
    # the Welcome of a gateway before confirmations (no max_message) ...
    old_welcome = b"\x94\xa7welcome\x01\xcdN \x92\xa8longpoll\xa4link"
    assert lp.decode(old_welcome) == lp.Welcome(1, 20000, ["longpoll", "link"], 0)


class _WelcomeBefore(msgspec.Struct, tag="welcome", array_like=True):
    """Welcome as workers before confirmations declare it."""

    version: int
    lease_ms: int
    features: list[str] = []


def test_a_worker_before_confirmations_reads_the_new_welcome() -> None:
    # ... and a worker that knows no max_message reads the new one (a trailing field)
    welcome = lp.encode(lp.Welcome(1, 20000, ["link", "stored"], 11534336))
    assert msgspec.msgpack.decode(welcome, type=_WelcomeBefore) == \
        _WelcomeBefore(1, 20000, ["link", "stored"])


@pytest.mark.parametrize("bad", [b"", b"\x92\xa4nope\x00", b"\x91\xa6credit", b"\xc1"])
def test_malformed_frames_raise(bad: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        lp.decode(bad)


def test_batch_golden_bytes_and_decode_all() -> None:
    frames: list[lp.Frame] = [lp.Credit(n=1), lp.Ack(request_id="x")]
    data = lp.encode_many(frames)
    assert data == b"\x92\xa5batch\x92\x92\xa6credit\x01\x92\xa3ack\xa1x"
    assert lp.decode_all(data) == frames
    assert lp.encode_many([lp.Credit(n=2)]) == lp.encode(lp.Credit(n=2))  # one frame: no batch
    assert lp.decode_all(lp.encode(lp.Credit(n=2))) == [lp.Credit(n=2)]
