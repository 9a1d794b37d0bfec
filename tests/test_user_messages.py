"""What a user reads when starting a worker by hand."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from tests.conftest import ROOT

ENV = dict(os.environ, PYTHONUNBUFFERED="1", SPIRIT_LOG_FORMAT="json")


def test_busy_test_mode_port_is_one_clear_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "spirit_gpu.supervisor", "examples/hello/main.py"],
            cwd=ROOT, env=dict(ENV, EASE_TEST_MODE="true", EASE_TEST_PORT=str(port)),
            capture_output=True, text=True, timeout=60)
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in out, out
    assert f"test mode: cannot listen on 127.0.0.1:{port}: the port is in use" in out


def test_python_script_names_the_script_it_hands_over() -> None:
    with socket.socket() as taken:  # a busy port: the worker stops right after handing over
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = subprocess.run(
            [sys.executable, "examples/hello/main.py"], cwd=ROOT, capture_output=True,
            text=True, timeout=60,
            env=dict(ENV, EASE_TEST_MODE="true", EASE_TEST_PORT=str(taken.getsockname()[1])))
    assert "handing over to `python -m spirit_gpu.supervisor examples/hello/main.py`" \
        in done.stdout, done.stdout + done.stderr
