"""A generator handler: yields input.n items; between items waits for input.gate files;
input.pad=N adds N bytes of padding to each item; input.runs=PATH appends a line to
PATH per run; input.stop=PID sends SIGSTOP to that process as the run starts (before
the run's line is written)."""

import contextlib
import os
import signal
import time

from spirit_gpu import start


def handler(request: dict, env: object):  # type: ignore[no-untyped-def, type-arg]
    data = request["input"]
    if data.get("stop"):  # first, so that a test seeing the run line knows it stopped
        with contextlib.suppress(ProcessLookupError):  # (a run again: the process is gone)
            os.kill(int(data["stop"]), signal.SIGSTOP)
    if data.get("runs"):
        with open(data["runs"], "a") as f:
            f.write("run\n")
    for i in range(int(data.get("n", 3))):
        yield {"i": i, "pad": "x" * int(data["pad"])} if data.get("pad") else {"i": i}
        gate = data.get("gate")
        if gate:  # the test creates <gate>.<i> to let the next item come
            deadline = time.monotonic() + 30
            while not os.path.exists(f"{gate}.{i}") and time.monotonic() < deadline:
                time.sleep(0.01)


start({"handler": handler})
