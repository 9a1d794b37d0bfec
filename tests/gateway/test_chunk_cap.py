"""A request's stream chunks are capped in bytes on both stores (each chunk counts
its length plus CHUNK_OVERHEAD, so empty chunks are bounded too)."""

from __future__ import annotations

from spirit_gpu.gateway.storage.base import CHUNK_OVERHEAD
from spirit_gpu.protocol import link as lp
from tests.conftest import until
from tests.gateway.conftest import AUTH, BOTH_STORES, GatewayFactory, Gw
from tests.gateway.test_link_limits import dispatches, open_link, send, submit

pytestmark = BOTH_STORES
CAP = 16 * 1024


async def _stream_ids(gw: Gw, sid: str, rid: str) -> list[int]:
    async with gw.session.get(f"{gw.url}/v1/{sid}/stream", params={"requestID": rid},
                              headers=AUTH) as resp:
        body = await resp.read()
    return [int(line[4:]) for line in body.split(b"\n") if line.startswith(b"id: ")]


async def test_chunks_past_the_cap_are_refused_and_the_result_stays_whole(
        gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(max_result_bytes_sync=CAP)  # also the chunk cap
    ws = await open_link(gw, "cap")
    rid = await submit(gw, "cap")
    await send(ws, lp.Credit(n=1))
    await dispatches(ws, 1)
    await send(ws, lp.Metric(request_id=rid, status="executing"))
    size = 1024 - CHUNK_OVERHEAD  # each chunk costs exactly 1 KiB of the cap
    await send(ws, *(lp.Chunk(request_id=rid, seq=i, data=b"x" * size) for i in range(40)))
    await send(ws, lp.Result(request_id=rid, status_code=200, message="", data=b'"ok"'))

    async def done() -> bool:
        return bool((await gw.status("cap", rid))["status"] == "succeed")
    await until(done, 10, "the result")
    # the first CAP / 1 KiB chunks, in order, and none past the cap
    assert await _stream_ids(gw, "cap", rid) == list(range(CAP // 1024))
    await ws.close()
