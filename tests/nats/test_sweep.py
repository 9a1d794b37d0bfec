"""A replica that knows many serverless ids without workers (scaled to zero): its
sweep reads one consumer list instead of one call per id, and a job lost mid-run
among them still fails; /metrics' per-id rows page through the list."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from spirit_gpu.gateway.storage.base import NewRequest
from spirit_gpu.gateway.storage.nats import NatsStorage
from tests.conftest import until
from tests.nats_server import TempNats

LEASE = 0.5
IDS = 40  # well past the few a sweep asks about one by one


def req(sid: str) -> NewRequest:
    return NewRequest(sid=sid, mode="async", body=b'{"input":1}', webhook="", ttl_ms=60_000)


@pytest.fixture
async def store(nats_server: TempNats) -> AsyncIterator[NatsStorage]:
    s = NatsStorage([nats_server.url], lease_seconds=LEASE)
    await s.start()
    try:
        yield s
    finally:
        await s.close()


async def test_many_idle_ids_are_swept_with_one_list_and_a_lost_job_still_fails(
        store: NatsStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(IDS):
        await store.submit(req(f"idle{i}"))
    rid = (await store.submit(req("lost"))).request_id
    taken = await store.take("lost", "w1", 1.0)
    assert taken is not None and taken.request_id == rid
    assert await store.mark_started("lost", rid)  # then the worker goes silent
    calls: dict[str, int] = {"one": 0, "list": 0}
    js: Any = store.js
    one, listing = js.consumer_info, js.consumers_info

    async def consumer_info(*args: Any, **kw: Any) -> Any:
        calls["one"] += 1
        return await one(*args, **kw)

    async def consumers_info(*args: Any, **kw: Any) -> Any:
        calls["list"] += 1
        return await listing(*args, **kw)
    monkeypatch.setattr(js, "consumer_info", consumer_info)
    monkeypatch.setattr(js, "consumers_info", consumers_info)

    async def failed() -> bool:
        await store.sweep()
        rec = await store.get("lost", rid)
        return rec is not None and rec.status == "failed"
    await until(failed, 15, "the lost job failed by a sweep")
    rec = await store.get("lost", rid)
    assert rec is not None and "worker lost" in rec.message
    assert calls["one"] == 0 and calls["list"] >= 1, calls


async def test_stats_list_every_id_past_one_page_of_consumers(store: NatsStorage) -> None:
    many = 256 + 4  # (the server lists 256 consumers an answer)
    for i in range(many):
        await store.submit(req(f"s{i:03d}"))
    rows = await store.stats()
    assert [r.sid for r in rows] == sorted(f"s{i:03d}" for i in range(many))
    assert all((r.queued, r.in_flight) == (1, 0) for r in rows)
