"""Gateway replicas as real processes (so they can be SIGKILLed), workers as real
supervisors, and a load that counts what became of every request."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from tests.conftest import ROOT, free_port
from tests.gateway.conftest import APPS, AUTH, KEY, TOKEN

TERMINAL = {"succeed", "failed", "cancelled"}
# scripts/nats-long.sh runs the failure tests with SPIRIT_NATS_SCALE=10 (10x the load)
SCALE = max(1, int(os.environ.get("SPIRIT_NATS_SCALE", "1")))


class Replica:
    def __init__(self, store: str, log: Path, port: int = 0, lease: float = 1.0) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log, "ab")  # noqa: SIM115 - closed in kill()
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from spirit_gpu.cli import main; raise SystemExit(main())",
             "gateway", "--host", "127.0.0.1", "--port", str(self.port), "--store", store,
             "--api-key", KEY, "--worker-token", TOKEN, "--lease-seconds", str(lease),
             "--sweep-interval", "0.2"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)

    async def ready(self, session: aiohttp.ClientSession, within: float = 20.0) -> Replica:
        deadline = time.monotonic() + within
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"replica exited: {self.log.read_text()[-2000:]}")
            try:
                async with session.get(f"{self.url}/v1/probe/status", headers=AUTH) as resp:
                    if resp.status == 200:
                        return self
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"replica not ready: {self.log.read_text()[-2000:]}")
            await asyncio.sleep(0.1)

    async def stop(self, within: float) -> None:
        """SIGTERM, as an orchestrator stops it; it must exit cleanly within ``within`` s."""
        self.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(self.proc.wait, within)  # raises if it takes longer
        assert self.proc.returncode == 0, self.log.read_text()[-2000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()


def worker_env(replica: Replica, sid: str, transport: str = "plain") -> dict[str, str]:
    return {"EASE_AGENT_URL": f"{replica.url}/agent/{sid}", "EASE_HEARTBEAT_INTERVAL": "0.2",
            "SPIRIT_PULL_BACKOFF_MAX": "0.2", "SPIRIT_TRANSPORT": transport,
            "SPIRIT_WORKER_TOKEN": TOKEN, "APP_CONCURRENCY": "4"}


DOUBLE = str(APPS / "double.py")


@dataclass
class Tally:
    """Requests accepted and what became of them; webhooks received per request."""

    accepted: list[str] = field(default_factory=list)
    refused: int = 0  # a submit that got an error or no answer (never accepted)
    hooks: Counter[str] = field(default_factory=Counter)
    final: dict[str, str] = field(default_factory=dict)

    def report(self) -> str:
        statuses = Counter(self.final.values())
        lost = len([r for r in self.accepted if self.final.get(r) not in TERMINAL])
        dup = len([r for r, n in self.hooks.items() if n > 1])
        return (f"sent {len(self.accepted) + self.refused}, accepted {len(self.accepted)}, "
                f"refused {self.refused}, terminal {sum(statuses[s] for s in TERMINAL)} "
                f"{dict(statuses)}, lost {lost}, duplicated {dup}")

    @property
    def lost(self) -> list[str]:
        return [r for r in self.accepted if self.final.get(r) not in TERMINAL]

    @property
    def duplicated(self) -> list[str]:
        return [r for r, n in self.hooks.items() if n > 1]


async def submit_async(session: aiohttp.ClientSession, url: str, sid: str, body: object,
                       hook: str, tally: Tally) -> None:
    try:
        async with session.post(f"{url}/v1/{sid}/async", json={"input": body, "webhook": hook},
                                headers=AUTH, timeout=aiohttp.ClientTimeout(total=30)) as resp:
            if resp.status == 200:
                tally.accepted.append((await resp.json())["id"])
                return
    except (TimeoutError, aiohttp.ClientError):
        pass
    tally.refused += 1


async def settle(session: aiohttp.ClientSession, url: str, sid: str, tally: Tally,
                 within: float) -> None:
    """Read every accepted request's status until all are terminal (or time is up)."""
    deadline = time.monotonic() + within
    while True:
        pending = [r for r in tally.accepted if tally.final.get(r) not in TERMINAL]
        for i in range(0, len(pending), 500):
            async with session.post(f"{url}/v1/{sid}/status", headers=AUTH,
                                    json={"requestIDs": pending[i:i + 500]}) as resp:
                if resp.status != 200:  # (a store failing over answers 500 a while)
                    break
                for st in (await resp.json())["statuses"]:
                    tally.final[st["requestID"]] = st["status"]
        if not tally.lost or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.2)
