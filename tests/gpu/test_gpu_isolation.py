"""GPU memory is per handler process: a killed, crashed or recycled child gives it back.

Needs PyTorch with a CUDA device; skipped (and reported as skipped) elsewhere.
``SPIRIT_GPU_REPORT=path.json`` writes the measured release times.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import pytest

from tests.conftest import free_port, post_json

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

GIB = 2**30
SLACK = 0.5 * GIB  # CUDA contexts and allocator rounding


def free_bytes() -> int:
    free, _total = torch.cuda.mem_get_info()
    return int(free)


def post(port: int, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    return post_json(port, {"input": payload}, timeout=120)


def wait_free(at_least: int, timeout: float = 60.0) -> float:
    """Seconds until the device has ``at_least`` bytes free again."""
    start = time.monotonic()
    while free_bytes() < at_least:
        if time.monotonic() - start > timeout:
            raise AssertionError(f"GPU memory not released: {free_bytes() / GIB:.2f} GiB free, "
                                 f"wanted {at_least / GIB:.2f}")
        time.sleep(0.02)
    return time.monotonic() - start


def wait_ready(port: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, _ = post(port, {})
            if status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("test-mode server never answered")
        time.sleep(0.2)


def test_gpu_memory_is_released_when_a_child_is_killed_crashes_or_recycles(
        worker_factory: Any) -> None:
    torch.cuda.init()
    port = free_port()
    worker = worker_factory(os.path.join(os.path.dirname(__file__), "apps", "cuda_app.py"),
                            {"EASE_TEST_MODE": "true", "EASE_TEST_PORT": str(port)})
    wait_ready(port)
    report: dict[str, float] = {}
    baseline = free_bytes()

    # 1. a child holding 8 GiB is SIGKILLed between jobs
    status, body = post(port, {"alloc_gib": 8})
    assert status == 200, body
    first = body["pid"]
    assert free_bytes() < baseline - 8 * GIB
    os.kill(first, signal.SIGKILL)
    report["sigkill_release_s"] = wait_free(baseline - SLACK)

    # 2. the replacement serves, and can take the memory again
    status, body = post(port, {"alloc_gib": 8})
    assert status == 200, body
    second = body["pid"]
    assert second != first
    assert free_bytes() < baseline - 8 * GIB

    # 3. a crash mid-job: the job fails with the exit code, the memory comes back
    status, body = post(port, {"alloc_gib": 2, "crash": True})
    assert status == 500 and "exited with code 13" in body["error"], body
    report["crash_release_s"] = wait_free(baseline - SLACK)

    # 4. env.recycle(): the answer comes, then the process and its memory go
    status, body = post(port, {"alloc_gib": 4, "recycle": True})
    assert status == 200, body
    recycled = body["pid"]
    report["recycle_release_s"] = wait_free(baseline - SLACK)
    status, body = post(port, {})
    assert status == 200 and body["pid"] != recycled and body["held_gib"] == 0

    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    report["after_exit_free_gib"] = free_bytes() / GIB
    report["baseline_free_gib"] = baseline / GIB
    if os.environ.get("SPIRIT_GPU_REPORT"):
        with open(os.environ["SPIRIT_GPU_REPORT"], "w") as fh:
            json.dump(report, fh, indent=2)
    print(json.dumps(report))
