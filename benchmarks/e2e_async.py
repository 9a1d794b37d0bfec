"""e2e_async: 2,000 async submissions through gateway + link worker, results by webhook.

Reports submissions/s (client: aiohttp, 32 in flight, in this process) and
the time until every result reached the webhook receiver (aiohttp, in this
process, 127.0.0.1), and how many were lost. Baseline: the same 2,000
requests through e2e_sync's path (sync API, same client, 32 in flight).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402
from common import Result, free_port, main_for, result, servers  # noqa: E402
from e2e_sync import AUTH, BODY, SID, start_gateway, start_worker  # noqa: E402

from spirit_gpu.loop import run as run_loop  # noqa: E402

N = 2000
DEPTH = 32


async def blast(session: aiohttp.ClientSession, url: str | list[str],
                bodies: list[bytes]) -> tuple[float, int]:
    """POST every body, DEPTH in flight; (seconds, failures). Several URLs: the
    lanes take them in turn (a round-robin balancer in front of replicas)."""
    urls = [url] if isinstance(url, str) else url
    it = iter(bodies)
    failures = 0

    async def lane(url: str) -> None:
        nonlocal failures
        for body in it:
            async with session.post(url, data=body, headers={**AUTH,
                                    "Content-Type": "application/json"}) as r:
                await r.read()
                if r.status != 200:
                    failures += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(lane(urls[i % len(urls)]) for i in range(DEPTH)))
    return time.perf_counter() - t0, failures


async def measure(gateway: str | list[str], n: int) -> dict[str, float]:
    """``gateway``: one, or replicas that the client's lanes take in turn."""
    gateways = [gateway] if isinstance(gateway, str) else gateway
    got: set[str] = set()
    all_in = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        got.add(request.query.get("requestID", str(len(got))))
        if len(got) >= n:
            all_in.set()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    hook_url = f"http://127.0.0.1:{port}/hook"
    data = json.loads(BODY)
    async_bodies = [json.dumps({**data, "webhook": hook_url}).encode() for _ in range(n)]
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=DEPTH)) as s:
            sync_s, sync_fail = await blast(s, [f"{g}/v1/{SID}/sync" for g in gateways],
                                            [BODY] * n)
            t0 = time.perf_counter()
            submit_s, submit_fail = await blast(s, [f"{g}/v1/{SID}/async" for g in gateways],
                                                async_bodies)
            try:
                await asyncio.wait_for(all_in.wait(), 120)
            except TimeoutError:
                pass
            done_s = time.perf_counter() - t0
    finally:
        await runner.cleanup()
    return {"sync_s": sync_s, "sync_fail": sync_fail, "submit_s": submit_s,
            "submit_fail": submit_fail, "done_s": done_s, "lost": n - len(got)}


async def accept_only(gateway: str, n: int, sid: str) -> float:
    """Submissions/s to a serverless id no worker serves: the queue only fills, so
    nothing else competes for the CPU. They stay queued (cleaning them would end
    each with a webhook call, and those calls would compete with the next run)."""
    body = json.dumps({**json.loads(BODY), "webhook": "http://127.0.0.1:9/unused"}).encode()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=DEPTH)) as s:
        secs, failed = await blast(s, f"{gateway}/v1/{sid}/async", [body] * n)
    if failed:
        raise RuntimeError(f"accept_only: {failed} of {n} refused")
    return n / secs


def run(quick: bool) -> list[Result]:
    with servers() as procs:
        gateway = start_gateway(procs)
        start_worker(procs, gateway, "link")
        m = run_loop(measure(gateway, N))
    assert isinstance(m, dict)
    return [
        result(f"e2e_async submissions ({N})", N / m["submit_s"], "req/s",
               "sync path, same client", N / m["sync_s"],
               goal=f"report ({m['submit_fail']:.0f} refused)"),
        result(f"e2e_async all {N} results by webhook", m["done_s"], "s",
               f"{N} sync requests", m["sync_s"]),
        result("e2e_async requests lost", m["lost"], "", goal="0", check=lambda v: v == 0),
    ]


if __name__ == "__main__":
    main_for(run, "e2e_async")
