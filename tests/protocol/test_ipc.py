"""Golden tests of the supervisor <-> child frames, byte for byte, and their framing."""

from __future__ import annotations

import os
import typing

import pytest

from spirit_gpu.protocol import ipc

GOLDEN: list[tuple[ipc.Message, bytes]] = [
    (ipc.Run(7, "r1", "sync", "", b'{"input":1}'),
     b'\x00\x00\x00\x1c\x96\xa3run\x07\xa2r1\xa4sync\xa0\xc4\x0b{"input":1}'),
    (ipc.Cancel(3, 408, "job timeout"),
     b"\x00\x00\x00\x18\x94\xa6cancel\x03\xcd\x01\x98\xabjob timeout"),
    (ipc.Stop(), b"\x00\x00\x00\x06\x91\xa4stop"),
    (ipc.AskConcurrency(2), b"\x00\x00\x00\x12\x92\xafask_concurrency\x02"),
    (ipc.CheckStart(), b"\x00\x00\x00\r\x91\xabcheck_start"),
    (ipc.Hello(123, "async", 4, {"mode": "handler"}),
     b"\x00\x00\x00\x1d\x95\xa5hello{\xa5async\x04\x81\xa4mode\xa7handler"),
    (ipc.Chunk(1, 0, b'"a"'), b'\x00\x00\x00\x0e\x94\xa5chunk\x01\x00\xc4\x03"a"'),
    (ipc.Done(1, 200, b"[]", "", False),
     b"\x00\x00\x00\x0f\x96\xa4done\x01\xcc\xc8\xc4\x02[]\xa0\xc2"),
    (ipc.Beat(3), b"\x00\x00\x00\x07\x92\xa4beat\x03"),
    (ipc.Concurrency(8), b"\x00\x00\x00\x0e\x92\xabconcurrency\x08"),
    (ipc.StartChecked(False, "not yet"),
     b"\x00\x00\x00\x18\x93\xadstart_checked\xc2\xa7not yet"),
    (ipc.Fatal("no start() call"), b"\x00\x00\x00\x17\x92\xa5fatal\xafno start() call"),
]


@pytest.mark.parametrize(("message", "wire"), GOLDEN, ids=lambda v: type(v).__name__)
def test_frame_bytes(message: ipc.Message, wire: bytes) -> None:
    assert ipc.encode(message) == wire
    assert ipc.decode(wire[4:]) == message


def test_every_message_has_a_golden_frame() -> None:
    union = set(typing.get_args(ipc.Message))
    assert {type(m) for m, _ in GOLDEN} == union


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
