"""Two NATS store replicas in one process: a job handed out by a replica that died
before writing all of it down stays with the worker that reports it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from spirit_gpu.gateway.storage.base import NewRequest
from spirit_gpu.gateway.storage.nats import NatsStorage
from tests.conftest import until
from tests.nats_server import TempNats

LEASE = 1.0


def req() -> NewRequest:
    return NewRequest(sid="c", mode="async", body=b'{"input":1}', webhook="", ttl_ms=60_000)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[NatsStorage, NatsStorage]]:
    server = TempNats()
    a = NatsStorage([server.url], lease_seconds=LEASE)
    b = NatsStorage([server.url], lease_seconds=LEASE)
    try:
        await a.start()
        await b.start()
        yield a, b
    finally:
        await b.close()
        await a.close()
        server.close()


async def status(store: NatsStorage, rid: str) -> tuple[str, str]:
    rec = await store.get("c", rid)
    assert rec is not None
    return rec.public_status, rec.holder


def seen(store: NatsStorage, rid: str, want: Callable[[tuple[str, str]], bool]
         ) -> Callable[[], object]:
    async def check() -> bool:
        return want(await status(store, rid))
    return check


async def test_a_delivery_put_back_by_its_lease_while_its_worker_ran_it(
        pair: tuple[NatsStorage, NatsStorage]) -> None:
    a, b = pair
    rid = (await a.submit(req())).request_id
    taken = await a.take("c", "link:w1", 1.0)
    assert taken is not None and taken.request_id == rid
    # its delivery written down (its start, not yet), then the replica dies
    await until(seen(b, rid, lambda s: s[1] == "link:w1"), 10, "the delivery written")
    await a.close()
    # nobody extends the lease: a sweep puts the job back in the queue
    assert await b.queue_length("c") == 0  # (b now watches the sid's queue)
    async def queued_again() -> bool:
        await b.sweep()
        return await status(b, rid) == ("queueing", "")
    await until(queued_again, 10, "the job queued again")
    # the worker, relinked to b (with a new link id), reports the job it runs
    assert await b.adopt("c", rid, "link:w2")
    assert await status(b, rid) == ("executing", "link:w2")
    # delivered again by the stream (it was put back): it stays with its worker, whose
    # heartbeats extend its lease from then on
    assert await b.take("c", "link:w3", LEASE / 2) is None
    assert await status(b, rid) == ("executing", "link:w2")
    for _ in range(3):  # three leases
        assert await b.heartbeat("c", "link:w2", [rid]) == []
        assert await b.take("c", "link:w3", LEASE / 2) is None
        assert await status(b, rid) == ("executing", "link:w2")
    assert await b.finish("c", rid, 200, "", b'"ok"')
    assert await status(b, rid) == ("succeed", "link:w2")


async def test_a_delivery_never_written_down(pair: tuple[NatsStorage, NatsStorage]) -> None:
    a, b = pair
    rid = (await a.submit(req())).request_id
    assert await a.take("c", "link:w1", 1.0) is not None
    await a.close()  # at once: the delivery is not written
    assert await status(b, rid) == ("queueing", "")
    assert await b.adopt("c", rid, "link:w2")
    assert await status(b, rid) == ("executing", "link:w2")


async def test_a_graceful_shutdown_writes_what_it_held_to_write_behind(
        pair: tuple[NatsStorage, NatsStorage]) -> None:
    a, b = pair
    rid = (await a.submit(req())).request_id
    assert await a.take("c", "link:w1", 1.0) is not None
    assert await a.mark_started("c", rid)
    await a.drain()  # (a gateway's SIGTERM: then close)
    await a.close()
    assert await status(b, rid) == ("executing", "link:w1")  # never handed out again
    assert await b.take("c", "link:w2", 0.3) is None


async def test_a_job_never_handed_out_is_not_adopted(
        pair: tuple[NatsStorage, NatsStorage]) -> None:
    _, b = pair
    rid = (await b.submit(req())).request_id
    assert not await b.adopt("c", rid, "link:w2")
    assert await status(b, rid) == ("queueing", "")
    taken = await b.take("c", "link:w3", 1.0)
    assert taken is not None and taken.request_id == rid
