"""The pipe framing refuses what a broken or hostile peer can send (ipc.FrameBuffer)."""

from __future__ import annotations

import os
import struct

import pytest

from spirit_gpu.protocol import ipc


def test_a_length_over_the_limit_is_refused_at_its_prefix() -> None:
    buf = ipc.FrameBuffer(max_frame=1024)
    with pytest.raises(ipc.FrameError, match="4294967295 bytes, over the 1024-byte limit"):
        buf.feed(struct.pack(">I", 0xFFFFFFFF))  # nothing of the body has come yet


def test_a_prefix_split_across_reads_is_refused_too() -> None:
    buf = ipc.FrameBuffer(max_frame=1024)
    assert buf.feed(ipc.encode(ipc.Beat(1)) + b"\x00\x10") == [ipc.Beat(1)]
    with pytest.raises(ipc.FrameError, match="over the 1024-byte limit"):
        buf.feed(b"\x00\x00")


def test_a_frame_at_the_limit_is_accepted() -> None:
    msg = ipc.Done(1, 200, b"x" * 1000)
    frame = ipc.encode(msg)
    assert ipc.FrameBuffer(max_frame=len(frame) - 4).feed(frame) == [msg]
    with pytest.raises(ipc.FrameError):
        ipc.FrameBuffer(max_frame=len(frame) - 5).feed(frame)


@pytest.mark.parametrize("body", [b"\xc1\xc1\xc1", b"\x93\xa4done\x01", b"\x91\xa4nope"])
def test_a_frame_that_is_not_a_message_is_refused(body: bytes) -> None:
    with pytest.raises(ipc.FrameError, match="malformed frame"):
        ipc.FrameBuffer().feed(struct.pack(">I", len(body)) + body)


def test_the_blocking_reader_applies_the_limit() -> None:
    r, w = os.pipe()
    try:
        os.write(w, struct.pack(">I", 1 << 30))
        with pytest.raises(ipc.FrameError):
            ipc.read_message(r, max_frame=1 << 20)
    finally:
        os.close(r)
        os.close(w)
