"""JetStreamCalls (the store's per-request publish and direct get) against a real
nats-server: acks, duplicates, compare-and-set refusals, misses, no responders,
timeouts."""

from __future__ import annotations

from collections.abc import AsyncIterator

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import StreamConfig
from nats.js.errors import APIError

from spirit_gpu.gateway.storage.nats.jsapi import JetStreamCalls
from spirit_gpu.gateway.storage.nats.wire import Wire
from tests.nats.conftest import live


@pytest.fixture
async def calls(nats_client: Client, wire: Wire) -> AsyncIterator[JetStreamCalls]:
    await nats_client.jetstream().add_stream(StreamConfig(
        name="T", subjects=["t.>"], allow_direct=True, duplicate_window=60.0))
    c = JetStreamCalls(wire, timeout=1.0)
    await c.start()
    yield c
    await c.close()


async def test_publish_answers_the_sequence_and_notices_duplicates(
        calls: JetStreamCalls) -> None:
    assert await calls.publish("t.a", b"one", {"Nats-Msg-Id": "m1"}) == (1, False)
    assert await calls.publish("t.a", b"one again", {"Nats-Msg-Id": "m1"}) == (1, True)
    assert await calls.publish("t.b", b"two") == (2, False)


async def test_a_lost_compare_and_set_is_an_api_error_with_its_code(
        calls: JetStreamCalls) -> None:
    await calls.publish("t.c", b"first", {"Nats-Expected-Last-Subject-Sequence": "0"})
    with pytest.raises(APIError) as refused:
        await calls.publish("t.c", b"second", {"Nats-Expected-Last-Subject-Sequence": "0"})
    assert refused.value.err_code == 10071  # wrong last sequence


async def test_last_reads_the_newest_message_of_a_subject_or_none(
        calls: JetStreamCalls) -> None:
    assert await calls.last("T", "t.d") is None
    await calls.publish("t.d", b"old")
    seq, _ = await calls.publish("t.d", b"new", {"X-Mark": "1"})
    got = await calls.last("T", "t.d")
    assert got is not None
    assert (got.data, got.seq, got.headers.get("X-Mark")) == (b"new", seq, "1")


async def test_a_subject_no_stream_takes_is_no_responders(calls: JetStreamCalls) -> None:
    with pytest.raises(nats.errors.NoRespondersError):
        await calls.publish("elsewhere.x", b"lost")


async def test_a_call_nobody_answers_times_out(calls: JetStreamCalls,
                                               nats_client: Client) -> None:
    heard: list[Msg] = []

    async def takes(msg: Msg) -> None:  # takes the message and never replies
        heard.append(msg)
    sub = await nats_client.subscribe("silent", cb=takes)
    await live(calls.wire, "silent", lambda: len(heard))
    with pytest.raises(nats.errors.TimeoutError):
        await calls.publish("silent", b"hello")
    await sub.unsubscribe()
    assert not calls._waiting  # nothing left behind
