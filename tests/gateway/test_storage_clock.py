"""Storage with an injected clock: leases, TTL expiry, retention and redelivery
stepped deterministically (no wall-clock sleeps).

Leases and retention of the NATS store are the server's (ack-wait, message TTL,
real time): those are covered by tests/nats with real processes. What the NATS
store decides by its own clock (queueing TTL, worker presence) runs here
against both stores."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from spirit_gpu.gateway.storage.base import NewRequest, Storage
from spirit_gpu.gateway.storage.memory import MemoryStorage
from tests.nats_server import TempNats


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def step(self, seconds: float) -> None:
        self.now += seconds


LEASE = 20.0


def req(ttl_ms: int = 60_000, mode: str = "async") -> NewRequest:
    return NewRequest(sid="c", mode=mode, body=b'{"input":1}', webhook="http://127.0.0.1:9/h",
                      ttl_ms=ttl_ms)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def memory(clock: Clock) -> MemoryStorage:
    return MemoryStorage(lease_seconds=LEASE, retention_seconds=60, max_deliveries=3,
                         clock=clock)


@pytest.fixture(params=["memory", "nats"])
async def any_store(request: pytest.FixtureRequest, clock: Clock) -> AsyncIterator[Storage]:
    if request.param == "memory":
        yield MemoryStorage(lease_seconds=LEASE, clock=clock)
        return
    from spirit_gpu.gateway.storage.nats import NatsStorage
    server = TempNats()
    store = NatsStorage([server.url], lease_seconds=LEASE, clock=clock)
    try:
        await store.start()
        yield store
    finally:
        await store.close()
        server.close()


# --- both stores -----------------------------------------------------------------------
async def test_queued_past_its_ttl_ends_408_and_is_never_handed_out(
        any_store: Storage, clock: Clock) -> None:
    rec = await any_store.submit(req(ttl_ms=1000))
    clock.step(0.5)
    got = await any_store.get("c", rec.request_id)
    assert got is not None and got.public_status == "queueing"
    clock.step(1.0)
    await any_store.sweep()
    assert await any_store.take("c", "w", 0) is None
    got = await any_store.get("c", rec.request_id)
    assert got is not None and (got.status, got.status_code) == ("failed", 408)
    assert "ttl" in got.message


async def test_a_worker_counts_for_one_lease_after_its_last_sign(
        any_store: Storage, clock: Clock) -> None:
    await any_store.touch_worker("c", "w1")
    assert await any_store.worker_count("c") == 1
    clock.step(LEASE - 1)
    assert await any_store.worker_count("c") == 1
    clock.step(2)
    assert await any_store.worker_count("c") == 0


async def test_first_terminal_status_wins(any_store: Storage) -> None:
    rec = await any_store.submit(req())
    # (waits: a JetStream consumer learns of a message just after its publish is
    # acknowledged, so a pull that will not wait can miss one submitted this instant)
    taken = await any_store.take("c", "w", 5.0)
    assert taken is not None and taken.request_id == rec.request_id
    assert await any_store.mark_started("c", rec.request_id)
    assert await any_store.finish("c", rec.request_id, 200, "", b"1")
    assert not await any_store.finish("c", rec.request_id, 500, "again", b"2")
    got = await any_store.get("c", rec.request_id)
    assert got is not None and (got.status, got.result) == ("succeed", b"1")


async def taking(store: Storage) -> None:
    """Until a take started meanwhile waits (for NATS: its pull is open at the server)."""
    await asyncio.sleep(0)  # (the memory store's take waits from its first step)
    if type(store).__name__ != "NatsStorage":
        return
    from nats.js.errors import NotFoundError

    from spirit_gpu.gateway.storage.nats import NatsStorage, names
    assert isinstance(store, NatsStorage)
    deadline = asyncio.get_running_loop().time() + 5.0
    while True:
        try:
            info = await store.js.consumer_info(names.JOBS, names.consumer("c"))
            if info.num_waiting:
                return
        except NotFoundError:  # (the consumer is made by the take itself)
            pass
        assert asyncio.get_running_loop().time() < deadline, "the take never waited"
        await asyncio.sleep(0.02)


async def test_a_take_given_up_leaves_what_comes_next_queued_and_counted(
        any_store: Storage) -> None:
    # a worker's long-poll or link that goes away while waiting for a job
    waiting = asyncio.create_task(any_store.take("c", "gone", 10.0))
    await taking(any_store)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    for _ in range(3):
        await any_store.submit(req())
    assert await any_store.queue_length("c") == 3
    await any_store.sweep()  # (no worker: the sweep leaves the queue as it is)
    assert await any_store.queue_length("c") == 3
    taken = await any_store.take("c", "w", 5.0)
    assert taken is not None and taken.deliveries == 1


async def test_a_job_given_back_counts_as_queued_once_no_worker_is_left(
        any_store: Storage, clock: Clock) -> None:
    await any_store.submit(req())
    await any_store.submit(req())
    taken = await any_store.take("c", "w", 5.0)
    assert taken is not None
    await any_store.give_back("c", taken.request_id)
    clock.step(LEASE + 1)  # the worker's presence lapses
    for _ in range(3):  # (sweeps probe what was handed out, and put it back)
        await any_store.sweep()
        assert await any_store.queue_length("c") == 2
        row, = [s for s in await any_store.stats() if s.sid == "c"]  # (/metrics)
        assert (row.queued, row.in_flight) == (2, 0)
    again = await any_store.take("c", "w2", 5.0)
    assert again is not None and again.request_id == taken.request_id


# --- memory: leases, redelivery, retention --------------------------------------------
async def test_lease_lost_before_start_redelivers(memory: MemoryStorage, clock: Clock) -> None:
    rec = await memory.submit(req())
    assert (await memory.take("c", "lost", 0)) is not None
    clock.step(LEASE - 1)
    await memory.sweep()
    assert (await memory.get("c", rec.request_id)).public_status == "executing"  # type: ignore[union-attr]
    clock.step(2)
    await memory.sweep()
    assert (await memory.get("c", rec.request_id)).public_status == "queueing"  # type: ignore[union-attr]
    again = await memory.take("c", "fresh", 0)
    assert again is not None and again.request_id == rec.request_id and again.deliveries == 2


async def test_lease_lost_while_running_fails_it(memory: MemoryStorage, clock: Clock) -> None:
    rec = await memory.submit(req())
    await memory.take("c", "w", 0)
    await memory.mark_started("c", rec.request_id)
    for _ in range(5):  # heartbeats keep it alive for many leases
        clock.step(LEASE * 0.8)
        assert await memory.heartbeat("c", "w", [rec.request_id]) == []
        await memory.sweep()
    assert (await memory.get("c", rec.request_id)).public_status == "executing"  # type: ignore[union-attr]
    clock.step(LEASE + 1)
    await memory.sweep()
    got = await memory.get("c", rec.request_id)
    assert got is not None and got.status_code == 500 and "while executing" in got.message
    assert await memory.heartbeat("c", "w", [rec.request_id]) == [rec.request_id]


async def test_a_job_delivered_too_often_fails(memory: MemoryStorage, clock: Clock) -> None:
    rec = await memory.submit(req())
    for n in range(3):
        taken = await memory.take("c", f"w{n}", 0)
        assert taken is not None and taken.deliveries == n + 1
        clock.step(LEASE + 1)
        await memory.sweep()
    got = await memory.get("c", rec.request_id)
    assert got is not None and got.status_code == 500
    assert "after 3 deliveries that never started" in got.message
    assert await memory.take("c", "w", 0) is None


async def test_results_are_kept_for_the_retention_then_gone(memory: MemoryStorage,
                                                            clock: Clock) -> None:
    rec = await memory.submit(req())
    await memory.take("c", "w", 0)
    await memory.finish("c", rec.request_id, 200, "", b"ok")
    clock.step(59)
    await memory.sweep()
    assert await memory.get("c", rec.request_id) is not None
    clock.step(2)
    await memory.sweep()
    assert await memory.get("c", rec.request_id) is None
