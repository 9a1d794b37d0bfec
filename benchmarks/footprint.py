"""footprint: supervisor RSS, and per-idle-child RSS over a bare interpreter.

The supervisor runs the echo app in test mode (EASE_TEST_MODE, 127.0.0.1),
with 2 idle children; RSS is read from /proc. Baseline: ``python -c`` RSS.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import APPS, PY, Result, free_port, main_for, median, result, servers, spawn, wait_ok  # noqa: E402,E501


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def bare_rss() -> float:
    proc = subprocess.Popen([PY, "-c", "import time; time.sleep(3)"])
    try:
        time.sleep(0.5)
        return rss_mib(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def run(quick: bool) -> list[Result]:
    bare = median([bare_rss() for _ in range(3)])
    with servers() as procs:
        port = free_port()
        sup = spawn([PY, "-m", "spirit_gpu.supervisor", str(APPS / "echo.py")], "footprint",
                    EASE_TEST_MODE="1", EASE_TEST_PORT=str(port), BENCH_KIND="sync",
                    SPIRIT_MIN_CHILDREN="2")
        procs.append(sup)
        wait_ok(f"http://127.0.0.1:{port}/", b'{"input": {"a": 1}}', within=60, proc=sup)
        end = time.monotonic() + 20
        while len(children_of(sup.pid)) < 2 and time.monotonic() < end:
            time.sleep(0.1)
        time.sleep(1.0)
        supervisor = rss_mib(sup.pid)
        kids = [rss_mib(pid) for pid in children_of(sup.pid)]
    per_child = median(kids) if kids else None
    return [
        result("footprint: supervisor RSS", supervisor, "MiB", "bare python -c", bare,
               "< 60 MiB", ratio=supervisor / bare, check=lambda _: supervisor < 60),
        result("footprint: idle child RSS over bare", None if per_child is None
               else per_child - bare, "MiB", "bare python -c", bare,
               goal=f"report ({len(kids)} children)"),
    ]


if __name__ == "__main__":
    main_for(run, "footprint")
