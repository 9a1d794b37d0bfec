"""The chaos suite's handler.

A sync generator (one job per process, ``CHAOS_CONCURRENCY`` processes): yields
``input.n`` items, ``input.sleep`` seconds apart, each naming its request's tag
and id (so a result that reaches the wrong request shows). While a job runs
the file ``$CHAOS_BUSY_DIR/<pid>`` exists, so the suite can kill a process in
the middle of a job. At start the process launches a
long-lived helper (``sleep``), as a handler that starts a model server does: a
grandchild of the supervisor that must not outlive its handler process.
"""

import os
import subprocess
import time

from spirit_gpu import start

BUSY_DIR = os.environ.get("CHAOS_BUSY_DIR", "")
HELPER_SECONDS = os.environ.get("CHAOS_HELPER_SECONDS", "")
CONCURRENCY = int(os.environ.get("CHAOS_CONCURRENCY", "1"))

if HELPER_SECONDS:
    helper = subprocess.Popen(["sleep", HELPER_SECONDS], stdin=subprocess.DEVNULL)


def handler(request, env):  # type: ignore[no-untyped-def]
    data = request["input"]
    busy = os.path.join(BUSY_DIR, str(os.getpid())) if BUSY_DIR else ""
    if busy:
        open(busy, "w").close()  # noqa: SIM115 - an empty marker
    try:
        for i in range(int(data.get("n", 1))):
            if data.get("sleep"):
                time.sleep(float(data["sleep"]))
            yield {"tag": data["tag"], "i": i, "rid": env.request_id}
    finally:
        if busy:
            try:
                os.unlink(busy)
            except OSError:
                pass


def concurrency(current):  # type: ignore[no-untyped-def]
    return CONCURRENCY


start({"handler": handler, "concurrency_modifier": concurrency})
