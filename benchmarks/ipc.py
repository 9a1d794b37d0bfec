"""ipc: per-job round trip supervisor -> child -> supervisor, 1 KB payload.

One in flight (µs per round trip) with a sync and with an async echo
handler, and 64 in flight (round trips/s) with the async one (a sync handler
runs one job at a time per child), through ``spirit_gpu.supervisor.pool.Pool``
with one child, against ``pipe_echo.RawEcho``: the same framing with nothing
else (uvloop parent, blocking child, reusable read buffers), the best a
Python parent and child do over a pipe pair.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import APPS, Result, main_for, median, result  # noqa: E402
from pipe_echo import Call, RawEcho, pipelined, sequential  # noqa: E402

from spirit_gpu.config import WorkerConfig  # noqa: E402
from spirit_gpu.loop import run as run_loop  # noqa: E402
from spirit_gpu.supervisor.jobs import Job  # noqa: E402
from spirit_gpu.supervisor.pool import Pool  # noqa: E402

DEPTH = 64


def json_body(size: int) -> bytes:
    """A request ``{"input": "xxx..."}`` of ``size`` bytes."""
    return b'{"input": "' + b"x" * max(0, size - 13) + b'"}'


async def open_pool(kind: str = "async") -> Pool:
    os.environ["BENCH_CONCURRENCY"] = str(DEPTH)
    os.environ["BENCH_KIND"] = kind
    cfg = WorkerConfig(max_children=1, min_children=1, async_children=1,
                       ping_interval=5.0, concurrency_interval=5.0, log_level="WARNING")
    pool = Pool(cfg, str(APPS / "echo.py"), [])
    await pool.start()
    await asyncio.wait_for(pool.wait_ready(), 60)
    return pool


def pool_caller(pool: Pool) -> Call:
    ids = itertools.count()

    async def call(body: bytes) -> bytes:
        outcome = await pool.run(Job(request_id=f"r{next(ids)}", body=body))
        if outcome.status_code != 200:
            raise RuntimeError(f"job failed: {outcome}")
        return outcome.body
    return call


async def close_pool(pool: Pool) -> None:
    await asyncio.wait_for(pool.drain(2.0), 10)


async def measure(quick: bool) -> list[Result]:
    runs = 7 if quick else 11  # short runs on a noisy VM: more of them, medians
    n_seq, n_pipe = (3000, 20000) if quick else (5000, 50000)
    body = json_body(1024)
    raw = RawEcho()
    await raw.start()
    pool = await open_pool("async")
    sync_pool = await open_pool("sync")
    call, sync_call = pool_caller(pool), pool_caller(sync_pool)
    seq_raw, seq_sync, seq_async, tp_raw, tp_pool = [], [], [], [], []
    try:
        for fn in (raw.roundtrip, call, sync_call):  # warm-up
            await sequential(fn, body, 200)
        for _ in range(runs):  # interleaved so all see the same machine state
            seq_raw.append(await sequential(raw.roundtrip, body, n_seq))
            seq_sync.append(await sequential(sync_call, body, n_seq))
            seq_async.append(await sequential(call, body, n_seq))
            tp_raw.append(await pipelined(raw.roundtrip, body, n_pipe, DEPTH))
            tp_pool.append(await pipelined(call, body, n_pipe, DEPTH))
    finally:
        await raw.close()
        await close_pool(pool)
        await close_pool(sync_pool)
    raw_us = median(seq_raw) * 1e6
    base = "pipe echo floor (uvloop + blocking child)"
    return [
        result("ipc round trip, 1 in flight, sync handler (1 KB)", median(seq_sync) * 1e6,
               "µs", base, raw_us, target=("<=", 2.5)),
        result("ipc round trip, 1 in flight, async handler (1 KB)", median(seq_async) * 1e6,
               "µs", base, raw_us, target=("<=", 3.0)),
        result(f"ipc throughput, {DEPTH} in flight, async handler (1 KB)", median(tp_pool),
               "rt/s", base + f", {DEPTH} in flight", median(tp_raw), target=(">=", 0.5)),
    ]


def run(quick: bool) -> list[Result]:
    return run_loop(measure(quick))


if __name__ == "__main__":
    main_for(run, "ipc")
