"""get_ended: a request this replica ended is read from its memory (the worker's
webhook call right after its result costs no round trip); any other request, or
one past its retention, is read from the stream."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from spirit_gpu.gateway.storage.base import NewRequest, StorageUnavailable
from spirit_gpu.gateway.storage.nats import NatsStorage
from tests.nats_server import TempNats

RETENTION = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def req() -> NewRequest:
    return NewRequest(sid="c", mode="async", body=b'{"input":1}',
                      webhook="http://127.0.0.1:9/hook", ttl_ms=60_000)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[TempNats, NatsStorage, NatsStorage, Clock]]:
    server = TempNats()
    clock = Clock()
    a = NatsStorage([server.url], retention_seconds=RETENTION, clock=clock)
    b = NatsStorage([server.url], retention_seconds=RETENTION, clock=clock)
    try:
        await a.start()
        await b.start()
        yield server, a, b, clock
    finally:
        await b.close()
        await a.close()
        server.close()


async def ended_by(a: NatsStorage) -> str:
    rid = (await a.submit(req())).request_id
    assert await a.take("c", "link:w1", 5.0) is not None
    assert await a.finish("c", rid, 200, "", b'{"answer": 42}')
    return rid


async def test_the_replica_that_ended_a_request_answers_it_without_the_stream(
        pair: tuple[TempNats, NatsStorage, NatsStorage, Clock]) -> None:
    server, a, b, _ = pair
    rid = await ended_by(a)
    # another replica reads it from the stream: the same end
    other = await b.get_ended("c", rid)
    assert other is not None
    assert (other.status, other.status_code, other.result, other.webhook) == \
        ("succeed", 200, b'{"answer": 42}', "http://127.0.0.1:9/hook")
    unknown = await a.get_ended("c", "no-such-request")
    assert unknown is None
    server.server.kill()
    with pytest.raises(StorageUnavailable):
        await a.get("c", rid)  # a read goes to the stream, which is gone
    mine = await a.get_ended("c", rid)  # ... this one does not
    assert mine is not None
    assert (mine.status, mine.status_code, mine.result, mine.webhook, mine.ended_by_gateway) \
        == ("succeed", 200, b'{"answer": 42}', "http://127.0.0.1:9/hook", False)
    with pytest.raises(StorageUnavailable):
        await a.get_ended("d", rid)  # (a serverless id of its own: not that request)


async def test_past_its_retention_an_ended_request_is_read_from_the_stream(
        pair: tuple[TempNats, NatsStorage, NatsStorage, Clock]) -> None:
    server, a, _, clock = pair
    rid = await ended_by(a)
    clock.now += RETENTION + 1
    server.server.kill()
    with pytest.raises(StorageUnavailable):  # (the stream, which answers 404 by then)
        await a.get_ended("c", rid)
