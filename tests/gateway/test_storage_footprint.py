"""What the memory store keeps per request, and the cheap "any worker?" question."""

from __future__ import annotations

import gc

from spirit_gpu.gateway.storage.base import NewRequest
from spirit_gpu.gateway.storage.memory import MemoryStorage


def _new() -> NewRequest:
    return NewRequest(sid="s", mode="sync", body=b'{"input":1}', webhook="", ttl_ms=60_000)


async def test_a_finished_request_costs_the_cyclic_gc_one_object() -> None:
    # full collections scan every tracked object: retained requests (30 min) must
    # not multiply that work, or the gateway's tail latency follows the retention
    store = MemoryStorage()
    await store.start()
    try:
        gc.collect()
        before = len(gc.get_objects())
        for _ in range(2000):
            await store.submit(_new())
            rec = await store.take("s", "w", 0)
            assert rec is not None
            if rec.sequence % 2:  # a generator's request keeps its chunks too
                await store.add_chunk("s", rec.request_id, 0, b"1")
            await store.finish("s", rec.request_id, 200, "", b'{"ok":1}')
        gc.collect()
        per_request = (len(gc.get_objects()) - before) / 2000
    finally:
        await store.close()
    assert per_request < 2.1  # the entry, plus a chunk list and set for half of them


async def test_has_worker_agrees_with_worker_count() -> None:
    store = MemoryStorage(lease_seconds=60)
    await store.start()
    try:
        assert not await store.has_worker("s") and await store.worker_count("s") == 0
        await store.touch_worker("s", "w1")
        assert await store.has_worker("s") and await store.worker_count("s") == 1
        assert not await store.has_worker("other")
    finally:
        await store.close()
