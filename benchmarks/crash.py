"""crash: a child's SIGKILL -> its job's failed result, and -> a replacement child ready.

Driven in-process through ``Pool`` (the supervisor's pool; the result is
timed where the supervisor hands it to its agent transport). Import time =
a fresh interpreter importing spirit_gpu and the child runtime, measured here.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PY, Result, main_for, median, result  # noqa: E402
from ipc import close_pool, open_pool  # noqa: E402

from spirit_gpu.loop import run as run_loop  # noqa: E402
from spirit_gpu.supervisor.jobs import Job  # noqa: E402


def import_time(runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([PY, "-c", "import spirit_gpu, spirit_gpu.child.runtime"], check=True,
                       timeout=60)
        times.append(time.perf_counter() - t0)
    return median(times)


async def measure(runs: int) -> tuple[list[float], list[float]]:
    pool = await open_pool("sync")
    report: list[float] = []
    replace: list[float] = []
    try:
        for i in range(runs):
            task = asyncio.ensure_future(pool.run(Job(request_id=f"c{i}",
                                                      body=b'{"input": {"sleep": 30}}')))
            end = time.monotonic() + 10
            while not any(c.jobs for c in pool.children.values()):
                if time.monotonic() > end:
                    raise RuntimeError("job never reached a child")
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)  # the child is inside the handler now
            victim = next(c for c in pool.children.values() if c.jobs)
            t0 = time.perf_counter()
            os.kill(victim.pid, signal.SIGKILL)
            outcome = await asyncio.wait_for(task, 10)
            report.append(time.perf_counter() - t0)
            assert outcome.status_code != 200, outcome
            end = time.monotonic() + 30
            while not any(c.state == "ready" and c.pid != victim.pid
                          for c in pool.children.values()):
                if time.monotonic() > end:
                    raise RuntimeError("no replacement child within 30 s")
                await asyncio.sleep(0.001)
            replace.append(time.perf_counter() - t0)
            # one good job resets the pool's crash streak, so no run waits out a back-off
            good = Job(request_id=f"ok{i}", body=b'{"input": 1}')
            ok = await asyncio.wait_for(pool.run(good), 30)
            assert ok.status_code == 200, ok
    finally:
        await close_pool(pool)
    return report, replace


def run(quick: bool) -> list[Result]:
    imp = import_time()
    report, replace = run_loop(measure(3 if quick else 7))
    return [
        result("crash: SIGKILL → failed result", median(report) * 1000, "ms", goal="< 100 ms",
               check=lambda v: v < 100),
        result("crash: SIGKILL → replacement ready", median(replace) * 1000, "ms",
               "import time", imp * 1000, f"< 1 s + import ({1000 + imp * 1000:.0f} ms)",
               check=lambda _: median(replace) < 1 + imp),
    ]


if __name__ == "__main__":
    main_for(run, "crash")
