"""The generated project runs: EASE_TEST_MODE server, valid input 200, invalid input 400."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spirit_gpu.cli import example_body
from tests.builder.conftest import CASES, REPO, build, write
from tests.conftest import free_port, post_json

READY_DEADLINE_S = 60.0


def _wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    """Poll until the test server accepts connections (or the process dies, or time runs out)."""
    deadline = time.monotonic() + READY_DEADLINE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"worker exited with {proc.returncode}:\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)  # polling interval, not ordering
    pytest.fail(f"worker not listening on {port} after {READY_DEADLINE_S}s:\n{log.read_text()}")


@pytest.fixture
def worker_processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:  # each in its own session: ends the supervisor and its children
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


# one real process per handler kind; both data types and both entry points are covered
SMOKE = [
    ("sync", "pydantic_v2.BaseModel", ["src/main.py"]),
    ("async", "dataclasses.dataclass", ["-m", "spirit_gpu.supervisor", "src/main.py"]),
    ("sync_generator", "dataclasses.dataclass", ["src/main.py"]),
    ("async_generator", "pydantic_v2.BaseModel", ["-m", "spirit_gpu.supervisor", "src/main.py"]),
]


@pytest.mark.parametrize(("kind", "data_type", "command"), SMOKE,
                         ids=[f"{k}-{d.split('.')[0]}" for k, d, _ in SMOKE])
def test_generated_worker_answers_200_and_400(
        tmp_path: Path, worker_processes: list[subprocess.Popen[bytes]],
        kind: str, data_type: str, command: list[str]) -> None:
    name, content, valid, invalid, field = CASES["openapi-components"]
    project = tmp_path / "proj"
    assert build("-i", str(write(tmp_path / name, content)), "-o", str(project),
                 "--data-type", data_type, "--handler-type", kind) == 0
    port = free_port()
    env = {**os.environ, "EASE_TEST_MODE": "true", "EASE_TEST_PORT": str(port),
           "PYTHONPATH": str(REPO)}
    log = tmp_path / "worker.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, *command], cwd=project, env=env, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)
    worker_processes.append(proc)
    _wait_ready(proc, port, log)

    status, body = post_json(port, {"input": valid})
    assert status == 200, body
    output = body["output"] if kind in ("sync", "async") else body[0]["output"]
    assert output["prompt"] == "a cat" and output["size"] == {"width": 512, "height": 512}

    # the sample `spirit-gpu dev src/main.py` prints, built from the schema, is answered
    status, body = post_json(port, json.loads(example_body(str(project / "src/main.py"))))
    assert status == 200, body

    status, body = post_json(port, {"input": invalid})
    assert status == 400, body
    assert body["error"] == "invalid input"
    assert field in {detail["field"] for detail in body["details"]}
