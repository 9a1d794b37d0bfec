"""BatchWriter: one write per loop turn, order kept through held writes and retries."""

from __future__ import annotations

import asyncio

from spirit_gpu.net.batch_writer import BatchWriter


def _join(items: list[bytes]) -> bytes:
    return b"|".join(items)


async def test_a_turns_items_go_out_in_one_write_and_alone_ones_at_once() -> None:
    writes: list[bytes] = []
    writer: BatchWriter[bytes] = BatchWriter(_join, writes.append)
    writer.send(b"now", now=True)
    assert writes == [b"now"]  # nothing else in flight: written without waiting a turn
    for item in (b"a", b"b", b"c"):
        writer.send(item)
    assert writes == [b"now"]
    await asyncio.sleep(0)
    assert writes == [b"now", b"a|b|c"]


async def test_max_batch_writes_as_soon_as_it_is_reached() -> None:
    writes: list[bytes] = []
    writer: BatchWriter[bytes] = BatchWriter(_join, writes.append, max_batch=2)
    for item in (b"1", b"2", b"3"):
        writer.send(item)
    assert writes == [b"1|2"]
    await asyncio.sleep(0)
    assert writes == [b"1|2", b"3"]


async def test_a_held_write_keeps_later_items_behind_it() -> None:
    writes: list[bytes] = []
    gate = asyncio.get_running_loop().create_future()

    def sink(data: bytes) -> asyncio.Future[None] | None:
        writes.append(data)
        return gate if data == b"slow" else None
    writer: BatchWriter[bytes] = BatchWriter(_join, sink)
    writer.send(b"slow", now=True)
    writer.send(b"x")
    writer.send(b"y")
    await asyncio.sleep(0.01)
    assert writes == [b"slow"]
    drained = asyncio.ensure_future(writer.wait_drained())
    await asyncio.sleep(0)
    assert not drained.done()
    gate.set_result(None)
    await writer.join()
    assert writes == [b"slow", b"x|y"] and drained.done()


async def test_a_failed_batch_is_retried_whole_before_anything_after_it() -> None:
    writes: list[bytes] = []
    fail = {"next": True}

    def sink(data: bytes) -> None:
        if fail["next"]:
            fail["next"] = False
            raise ConnectionResetError("cut")
        writes.append(data)

    async def retry(batch: list[bytes], exc: Exception) -> None:
        await asyncio.sleep(0.01)
        writes.append(b"retried:" + _join(batch))
    writer: BatchWriter[bytes] = BatchWriter(_join, sink, on_error=retry)
    writer.send(b"result")
    writer.send(b"ack")
    await asyncio.sleep(0)
    writer.send(b"later")  # queued while the retry holds the writer
    await writer.join()
    assert writes == [b"retried:result|ack", b"later"]


async def test_without_on_error_a_failure_closes_the_writer() -> None:
    def sink(data: bytes) -> None:
        raise ConnectionResetError("gone")
    writer: BatchWriter[bytes] = BatchWriter(_join, sink)
    writer.send(b"a")
    await asyncio.sleep(0)
    assert writer.closed
    writer.send(b"b")  # ignored
    await writer.join()
