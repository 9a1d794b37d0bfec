"""The gateway refuses, in one line, a store it cannot keep its promises with."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spirit_gpu.gateway.storage.nats import server
from tests.conftest import ROOT, free_port
from tests.nats_server import TempNats, require_binary


def gateway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from spirit_gpu.cli import main; raise SystemExit(main())",
         "gateway", "--api-key", "k", "--port", "0", *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT)


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_a_server_without_jetstream_is_refused() -> None:
    binary = require_binary()
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        proc = subprocess.Popen([binary, "-a", "127.0.0.1", "-p", str(port)],
                                stdout=open(Path(d) / "log", "wb"), stderr=subprocess.STDOUT)
        try:
            from tests.nats_server import NatsServer
            probe = NatsServer(Path(d), port=port)
            probe.proc = proc
            probe.wait_ready()
            done = gateway("--store", f"nats://127.0.0.1:{port}")
            line = one_line(done)
        finally:
            proc.kill()
            proc.wait()
    assert "JetStream off" in line and "-js" in line
    assert "disconnected" not in done.stdout  # closing it ourselves is no outage


def test_an_unreachable_server_and_a_bad_store_are_refused() -> None:
    line = one_line(gateway("--store", f"nats://127.0.0.1:{free_port()}"))
    assert "cannot reach NATS" in line
    line = one_line(gateway("--store", "redis://somewhere"))
    assert "expected 'memory' or nats://" in line
    line = one_line(gateway("--store", "nats://127.0.0.1:abc"))  # a port that is no number
    assert "expected 'memory' or nats://" in line and "nats://127.0.0.1:abc" in line


def test_a_listener_that_never_speaks_nats_is_refused_in_bounded_time() -> None:
    # a wrong port or a firewall: TCP connects, no NATS INFO ever comes
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel completes connections; nothing is ever written
        began = time.monotonic()
        done = gateway("--store", f"nats://127.0.0.1:{silent.getsockname()[1]}")
        line = one_line(done)
    assert "no NATS server answered" in line
    assert "NATS:" not in done.stdout  # (its tries' errors are not logged one by one)
    assert time.monotonic() - began < server.FIRST_CONNECT + 3 + 20  # (start-up included)


def test_refused_or_missing_credentials_are_said_at_once_without_the_password() -> None:
    nats = TempNats(user="spirit", password="right")
    try:
        began = time.monotonic()
        done = gateway("--store", nats.server.url_as("spirit", "wrong-one"))
        line = one_line(done)
        assert "refused the credentials" in line and "nats://spirit:***@" in line
        assert "wrong-one" not in done.stdout + done.stderr
        assert "NATS:" not in done.stdout  # (no warnings before the one line)
        assert time.monotonic() - began < server.FIRST_CONNECT  # not the 10 s timeout
        line = one_line(gateway("--store", nats.url))
        assert "asks for credentials" in line and "nats://USER:PASSWORD@HOST:4222" in line
    finally:
        nats.close()


def test_replicas_beyond_a_single_server_are_refused_at_once() -> None:
    nats = TempNats()
    try:
        began = time.monotonic()
        line = one_line(gateway("--store", nats.url, "--store-replicas", "3"))
        assert "--store-replicas 3 needs a NATS cluster of at least 3 nodes" in line
        assert "not supported in non-clustered mode" in line
        assert time.monotonic() - began < 20  # not the 30 s of waiting for a cluster
    finally:
        nats.close()


def test_servers_older_than_2_11_are_too_old() -> None:
    assert server._version("2.9.25") < server.MIN_VERSION  # Debian's: ignores Nats-TTL
    assert server._version("2.11.0") >= server.MIN_VERSION
    assert server._version("2.15.1") >= server.MIN_VERSION
    assert server._version("garbage") < server.MIN_VERSION
