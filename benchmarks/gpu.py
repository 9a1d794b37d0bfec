"""gpu: a small torch model served through handler mode vs called in-process.

The model (apps/torch_model.py: an MLP, fp32, a few ms per call on a
data-centre GPU) is called one request at a time, (a) in this process, (b)
through ``spirit_gpu.supervisor.pool.Pool`` with one child running
apps/torch_handler.py (a sync handler: request JSON in, result JSON out over
the pipe). Rounds alternate between the two. Throughput = calls/s, one in
flight; added p50 = handler p50 - in-process p50.

Needs a CUDA device and torch: ``python benchmarks/run.py --only gpu``.
Elsewhere every row says why it was skipped. (``BENCH_GPU_DEVICE=cpu`` runs
it on the CPU, to try the benchmark out; such numbers say nothing about GPUs.)
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "apps"))

from common import APPS, Result, main_for, median, result, skipped  # noqa: E402

from spirit_gpu.config import WorkerConfig  # noqa: E402
from spirit_gpu.loop import run as run_loop  # noqa: E402
from spirit_gpu.supervisor.jobs import Job  # noqa: E402
from spirit_gpu.supervisor.pool import Pool  # noqa: E402

THROUGHPUT = "gpu model through handler mode: throughput, 1 in flight"
ADDED = "gpu model through handler mode: added p50"


def model_module() -> Any:
    return importlib.import_module(os.environ.get("BENCH_GPU_MODEL_MODULE", "torch_model"))


def skip_rows(why: str) -> list[Result]:
    return [skipped(THROUGHPUT, why, "calls/s", "in-process calls", target=(">=", 0.95)),
            skipped(ADDED, why, "ms", goal="< 1 ms", target=("<", 1.0))]


async def measure(quick: bool) -> dict[str, Any]:
    mod = model_module()
    rounds, n = (3, 100) if quick else (5, 300)
    cfg = WorkerConfig(max_children=1, min_children=1, ping_interval=5.0,
                       concurrency_interval=5.0, log_level="WARNING")
    pool = Pool(cfg, str(APPS / "torch_handler.py"), [])
    await pool.start()
    await asyncio.wait_for(pool.wait_ready(), 300)
    model = await asyncio.to_thread(mod.build)
    ids = itertools.count()

    async def via_handler(seed: int) -> None:
        body = json.dumps({"input": {"seed": seed}}).encode()
        outcome = await pool.run(Job(request_id=f"g{next(ids)}", body=body))
        if outcome.status_code != 200:
            raise RuntimeError(f"handler failed: {outcome.status_code} {outcome.body[:300]!r}")

    async def in_process(seed: int) -> None:
        mod.infer(model, {"seed": seed})  # blocks the loop, as a plain call would

    samples: dict[str, list[float]] = {"handler": [], "inproc": []}
    rates: dict[str, list[float]] = {"handler": [], "inproc": []}
    try:
        for fn in (via_handler, in_process):  # warm-up
            for i in range(10):
                await fn(i)
        for _ in range(rounds):
            for name, fn in (("inproc", in_process), ("handler", via_handler)):
                t_round = time.perf_counter()
                for i in range(n):
                    t0 = time.perf_counter()
                    await fn(i)
                    samples[name].append(time.perf_counter() - t0)
                rates[name].append(n / (time.perf_counter() - t_round))
    finally:
        await asyncio.wait_for(pool.drain(5.0), 30)
    return {"p50": {k: median(v) * 1000 for k, v in samples.items()},
            "rate": {k: median(v) for k, v in rates.items()}, "what": mod.describe()}


def run(quick: bool) -> list[Result]:
    why = model_module().available()
    if why:
        return skip_rows(why)
    m = run_loop(measure(quick))
    assert isinstance(m, dict)
    added = m["p50"]["handler"] - m["p50"]["inproc"]
    return [
        result(THROUGHPUT, m["rate"]["handler"], "calls/s", "in-process calls",
               m["rate"]["inproc"], target=(">=", 0.95)),
        result(ADDED, added, "ms", goal=f"< 1 ms (in-process p50 {m['p50']['inproc']:.3g} ms; "
               f"{m['what']})", target=("<", 1.0)),
    ]


if __name__ == "__main__":
    main_for(run, "gpu")
