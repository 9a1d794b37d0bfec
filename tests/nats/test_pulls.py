"""Puller (one sid's pulls on one subscription) against a real nats-server: batches,
the empty and expired endings, first come first served between open pulls, a
pull given up forgotten by the server, a delivery nobody wants any more handed
back at once, a cancelled pull's deliveries handed back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, RetentionPolicy, StreamConfig

from spirit_gpu.gateway.storage.nats.pulls import Puller, delivery
from spirit_gpu.gateway.storage.nats.wire import Wire
from tests.nats.conftest import live

ACK_WAIT = 30.0  # far beyond every test: a redelivery seen here came from a -NAK


async def until_consumer(queue: Queue, check: Callable[[ConsumerInfo], bool],
                         what: str) -> None:
    deadline = asyncio.get_running_loop().time() + 5.0
    while not check(info := await queue.nc.jetstream().consumer_info("Q", "c")):
        assert asyncio.get_running_loop().time() < deadline, f"{what}: {info}"
        await asyncio.sleep(0.02)


@dataclass
class Queue:
    nc: Client
    puller: Puller
    verbs: list[bytes]  # what was sent on the deliveries' ack subjects, in order

    async def handed_back(self, n: int) -> None:
        deadline = asyncio.get_running_loop().time() + 5.0
        while self.verbs.count(b"-NAK") < n:
            assert asyncio.get_running_loop().time() < deadline, f"no -NAK: {self.verbs}"
            await asyncio.sleep(0.01)

    async def put(self, *names: str) -> None:
        for name in names:
            await self.nc.jetstream().publish(f"q.{name}", name.encode())

    async def pull(self, want: int, wait: float = 0.0,
                   timeout: float = 5.0) -> tuple[list[str], bool]:
        req: dict[str, object] = ({"batch": want, "expires": int(wait * 1e9)} if wait
                                  else {"batch": want, "no_wait": True})
        got, trouble = await self.puller.pull(req, want, timeout)
        for msg in got:
            await self.nc.publish(msg.reply, b"+ACK")
        return [m.data.decode() for m in got], trouble


@pytest.fixture
async def queue(nats_client: Client, wire: Wire) -> AsyncIterator[Queue]:
    nc = nats_client
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="Q", subjects=["q.*"],
                                     retention=RetentionPolicy.WORK_QUEUE))
    await js.add_consumer("Q", ConsumerConfig(durable_name="c", ack_wait=ACK_WAIT,
                                              ack_policy=AckPolicy.EXPLICIT))
    puller = Puller(wire, "$JS.API.CONSUMER.MSG.NEXT.Q.c")
    await puller.start()
    verbs: list[bytes] = []

    async def seen(msg: Msg) -> None:
        verbs.append(msg.data)
    await nc.subscribe("$JS.ACK.Q.c.>", cb=seen)  # (a core subscriber sees them too)
    await nc.flush()
    yield Queue(nc, puller, verbs)
    await puller.close()


async def test_a_batch_takes_what_is_queued_and_ends_when_the_queue_runs_dry(
        queue: Queue) -> None:
    await queue.put("a", "b", "c")
    assert await queue.pull(2) == (["a", "b"], False)
    assert await queue.pull(2) == (["c"], False)  # ended by the server's 404
    assert await queue.pull(2) == ([], False)


async def test_a_waiting_pull_gets_what_comes_or_ends_empty_when_it_expires(
        queue: Queue) -> None:
    waiting = asyncio.create_task(queue.pull(1, wait=5.0))
    await asyncio.sleep(0)  # (the pull goes out before the publish below)
    await queue.put("late")
    assert await asyncio.wait_for(waiting, 5.0) == (["late"], False)
    assert await queue.pull(1, wait=0.2) == ([], False)  # ended by the server's 408


async def test_open_pulls_are_served_first_come_first_served(queue: Queue) -> None:
    first = asyncio.create_task(queue.pull(1, wait=5.0))
    second = asyncio.create_task(queue.pull(2, wait=5.0))
    await asyncio.sleep(0.1)
    await queue.put("one", "two", "three")
    assert await asyncio.wait_for(first, 5.0) == (["one"], False)
    assert await asyncio.wait_for(second, 5.0) == (["two", "three"], False)


async def test_a_pull_that_gave_up_is_forgotten_by_the_server(queue: Queue) -> None:
    gave_up = asyncio.create_task(queue.pull(1, wait=10.0))
    await until_consumer(queue, lambda c: c.num_waiting == 1, "the pull open")
    gave_up.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gave_up
    # its subscription dropped: the server no longer serves it
    await until_consumer(queue, lambda c: c.num_waiting == 0, "the pull forgotten")
    await queue.put("next")
    # (the consumer counts a new message a moment after the stream stored it)
    await until_consumer(queue, lambda c: c.num_pending + c.num_ack_pending == 1, "counted")
    info = await queue.nc.jetstream().consumer_info("Q", "c")
    assert (info.num_pending, info.num_ack_pending) == (1, 0)  # queued, not handed out
    assert await queue.pull(1, wait=5.0) == (["next"], False)
    assert b"-NAK" not in queue.verbs  # nothing was handed back


async def test_a_delivery_for_a_pull_nobody_waits_for_is_handed_back_at_once(
        queue: Queue) -> None:
    # a pull open at the server under the puller's subscription that nobody here waits
    # for (one given up while its subscription is still in use: the moment before
    # the server drops it)
    await queue.nc.publish("$JS.API.CONSUMER.MSG.NEXT.Q.c",
                           b'{"batch": 1, "expires": 10000000000}',
                           reply=f"{queue.puller._inbox}.stray")
    await until_consumer(queue, lambda c: c.num_waiting == 1, "the stray pull open")
    await queue.put("orphan")
    await queue.handed_back(1)
    # the next pull has it now, not after the 30 s lease
    assert await queue.pull(1, wait=5.0) == (["orphan"], False)


async def test_a_pull_cancelled_with_deliveries_in_hand_hands_them_back(
        queue: Queue) -> None:
    await queue.put("x", "y")
    # two of three: no 404 follows, so the pull is still waiting for a third
    pull = asyncio.create_task(queue.pull(3, wait=10.0))
    deadline = asyncio.get_running_loop().time() + 5.0
    while sum(len(p.got) for p in queue.puller._open.values()) < 2:
        assert asyncio.get_running_loop().time() < deadline, "deliveries never came"
        await asyncio.sleep(0.01)
    pull.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pull
    await queue.handed_back(2)
    got, _ = await queue.pull(2, wait=5.0)
    assert sorted(got) == ["x", "y"]


async def test_a_server_that_says_nothing_is_a_timeout(queue: Queue) -> None:
    heard: list[Msg] = []

    async def silent(msg: Msg) -> None:
        heard.append(msg)
    await queue.nc.subscribe("silent", cb=silent)
    await live(queue.puller.wire, "silent", lambda: len(heard))
    queue.puller.subject = "silent"
    with pytest.raises(nats.errors.TimeoutError):
        await queue.pull(1, timeout=0.3)
    assert not queue.puller._open


def test_a_delivery_reads_its_ack_subject_in_both_forms() -> None:
    old = delivery(b"d", "$JS.ACK.JOBS.c-sid.2.41.40.1700000000000000000.5")
    assert (old.delivered, old.sequence, old.pending) == (2, 41, 5)
    new = delivery(b"d", "$JS.ACK.hub.ACCHASH.JOBS.c-sid.1.7.6.1700000000000000000.0.tok")
    assert (new.delivered, new.sequence, new.pending) == (1, 7, 0)
    with pytest.raises(ValueError):
        delivery(b"d", "_INBOX.abc.1")
