"""Compatibility set-up: the original spirit-gpu worker (from the registry, in its own
venv), the ``spirit-gpu agent`` sidecar as a real process, and the gateway fixtures."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.compat import original_venv
from tests.compat.hosted_agent import HostedAgent, start_hosted_agent
from tests.conftest import ROOT, free_port, until
from tests.gateway.conftest import (  # noqa: F401 - fixtures used by the tests here
    GatewayFactory,
    Gw,
    gateway_factory,
    gw,
    webhooks,
)
from tests.proxy.conftest import llm  # noqa: E402,F401 - a fixture used here

APPS = Path(__file__).resolve().parent / "apps"


@pytest.fixture(scope="session")
def original_python() -> Path:
    python, why = original_venv.prepare()
    if python is None and os.environ.get("SPIRIT_REQUIRE_ORIGINAL") == "1":
        pytest.fail(f"SPIRIT_REQUIRE_ORIGINAL=1 but {why}")
    if python is None:
        pytest.skip(f"the original worker ({original_venv.REQUIREMENT}) is not available: {why}")
    return python


class Proc:
    """A process of a test; its output is kept in a file for assertions."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=str(log.parent))

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        self.kill()
        self._log.close()


class Procs:
    def __init__(self, where: Path) -> None:
        self.where = where
        self.all: list[Proc] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> Proc:
        proc = Proc(args, env, self.where / f"{len(self.all)}-{name}.log")
        self.all.append(proc)
        return proc

    async def sidecar(self, gateway: Gw, sid: str, token: str | None = None) -> str:
        """``spirit-gpu agent`` for ``sid`` of ``gateway`` (with the gateway's worker token
        unless ``token`` says otherwise); its URL once it listens."""
        port = free_port()
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
        proc = self.start("agent", [sys.executable, "-m", "spirit_gpu.cli", "agent",
                                    "--gateway", gateway.url, "--serverless-id", sid,
                                    "--port", str(port),
                                    "--worker-token",
                                    gateway.config.worker_token if token is None else token],
                           env)

        async def listening() -> bool:
            assert proc.alive(), proc.output
            return "listening on" in proc.output
        await until(listening, 20, "the sidecar listening")
        return f"http://127.0.0.1:{port}"

    def original(self, python: Path, app: str, agent_url: str, **extra: str) -> Proc:
        """The original worker running ``app`` against ``agent_url``."""
        env = original_venv.clean_env()
        env.update({"EASE_AGENT_URL": agent_url, "EASE_HEARTBEAT_INTERVAL": "1", **extra})
        return self.start("original", [str(python), str(APPS / app)], env)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    for proc in p.all:
        proc.stop()


@pytest.fixture
async def hosted_agent() -> AsyncIterator[HostedAgent]:
    async for agent in start_hosted_agent():
        yield agent


async def seen(proc: Proc, text: str, within: float = 20.0) -> None:
    async def check() -> bool:
        return text in proc.output
    await until(check, within, f"{text!r} in the log of {proc.log_path.name}")
