"""The soak's handler: a generator that yields ``input.n`` items, ``input.sleep``
seconds apart; ``SOAK_CONCURRENCY`` handler processes, one job each."""

import os
import time

from spirit_gpu import start

CONCURRENCY = int(os.environ.get("SOAK_CONCURRENCY", "4"))


def handler(request, env):
    data = request["input"]
    for i in range(int(data.get("n", 1))):
        if data.get("sleep"):
            time.sleep(float(data["sleep"]))
        yield {"i": i, "pad": "x" * int(data.get("pad", 0))}


start({"handler": handler, "concurrency_modifier": lambda current: CONCURRENCY})
