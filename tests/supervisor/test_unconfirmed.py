"""What the worker link keeps until the gateway confirms it (transports/unconfirmed.py)."""

from __future__ import annotations

import pytest

from spirit_gpu.protocol import link as lp
from spirit_gpu.supervisor.transports.unconfirmed import FRAME_BYTES, Outgoing, Unconfirmed


def _out(frame: lp.Frame) -> Outgoing:
    return Outgoing(frame, 1, getattr(frame, "request_id", ""), None)


async def test_unconfirmed_frames_are_counted_kept_confirmed_and_bounded(
        capfd: pytest.CaptureFixture[str]) -> None:
    kept = Unconfirmed(max_bytes=3 * FRAME_BYTES + 300)
    assert kept.new_link(True, max_message=1000) == []
    credit, chunks = _out(lp.Credit(4)), [_out(lp.Chunk("r", i, b"x" * 100)) for i in range(4)]
    kept.writing([credit, *chunks[:2]])  # frames 1, 2, 3: the credit is counted, not kept
    assert [o.n for o in (credit, *chunks[:2])] == [1, 2, 3]
    assert list(kept.frames) == chunks[:2]
    kept.stored(2)
    assert list(kept.frames) == chunks[1:2]
    # a write that failed: kept after what was written before it, written on no link
    huge = _out(lp.Result("r", 200, "", b"x" * 2000))  # more than the gateway reads
    assert kept.unsent([chunks[2], _out(lp.Heartbeat([])), huge])[1:] == [huge]
    assert kept.unwritten() == [chunks[2]]
    # the next link: everything kept goes first, counted again from 1
    assert kept.new_link(True, max_message=1000) == chunks[1:3]
    kept.writing(chunks[1:3])
    assert [o.n for o in chunks[1:3]] == [1, 2]
    kept.writing([chunks[3], _out(lp.Chunk("r", 4, b"x" * 100))])  # past the cap
    assert [o.frame.seq for o in kept.frames] == [2, 3, 4]  # type: ignore[attr-defined]
    assert "the oldest 1 are let go" in capfd.readouterr().out
    kept.stored(4)
    assert not kept and kept.none.is_set()


def test_frames_sent_again_travel_in_messages_the_gateway_reads() -> None:
    kept = Unconfirmed()
    kept.new_link(True, max_message=4 * FRAME_BYTES + 1000)
    frames = [_out(lp.Chunk("r", i, b"x" * 500)) for i in range(5)]
    assert [len(m) for m in kept.messages(frames)] == [2, 2, 1]
