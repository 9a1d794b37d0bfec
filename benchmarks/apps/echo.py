"""Trivial spirit-gpu handler used by the benchmarks: returns its input.

``BENCH_KIND=sync`` makes it a plain function (one job per child at a time);
the default is an async handler that runs up to ``BENCH_CONCURRENCY`` jobs at
once in one child. ``input.sleep`` makes it sleep first (crash benchmark).
"""

import asyncio
import os
import time
from typing import Any

from spirit_gpu import start
from spirit_gpu.env import Env

CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "64"))


async def async_handler(request: dict[str, Any], env: Env) -> Any:
    data = request["input"]
    if isinstance(data, dict) and data.get("sleep"):
        await asyncio.sleep(float(data["sleep"]))
    return data


def sync_handler(request: dict[str, Any], env: Env) -> Any:
    data = request["input"]
    if isinstance(data, dict) and data.get("sleep"):
        time.sleep(float(data["sleep"]))
    return data


if os.environ.get("BENCH_KIND") == "sync":
    start({"handler": sync_handler})
else:
    start({"handler": async_handler, "concurrency_modifier": lambda current: CONCURRENCY})
