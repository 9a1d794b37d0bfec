"""The same trivial handler for runpod-python's local API server (in-process, no isolation).

Run: python rp_echo.py --rp_serve_api --rp_api_host 127.0.0.1 --rp_api_port P
"""

import os
from typing import Any

import runpod

CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "64"))


async def handler(job: dict[str, Any]) -> Any:
    return job["input"]


runpod.serverless.start({"handler": handler, "concurrency_modifier": lambda current: CONCURRENCY})
