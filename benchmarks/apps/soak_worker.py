"""The soak's handler: a generator that yields ``input.n`` items, ``input.sleep``
seconds apart; ``SOAK_CONCURRENCY`` handler processes, one job each."""

import os
import time
from collections.abc import Iterator
from typing import Any

from spirit_gpu import start
from spirit_gpu.env import Env

CONCURRENCY = int(os.environ.get("SOAK_CONCURRENCY", "4"))


def handler(request: dict[str, Any], env: Env) -> Iterator[dict[str, Any]]:
    data = request["input"]
    for i in range(int(data.get("n", 1))):
        if data.get("sleep"):
            time.sleep(float(data["sleep"]))
        yield {"i": i, "pad": "x" * int(data.get("pad", 0))}


start({"handler": handler, "concurrency_modifier": lambda current: CONCURRENCY})
