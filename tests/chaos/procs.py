"""Processes the chaos suite starts and finds, read from /proc.

Every process the suite starts carries ``CHAOS_RUN=<run id>`` in its environment,
and so do the handler processes and their helpers (the supervisor passes its
environment on): after the run, any live process with that variable was left
behind. Processes are named by (pid, start time), so a pid the kernel reuses
for someone else's process is never mistaken for ours.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import ROOT

RUN_VAR = "CHAOS_RUN"


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    state: str
    start: int  # clock ticks after boot: with the pid, names one process

    @property
    def running(self) -> bool:
        return self.state not in ("Z", "X")


def info(pid: int) -> ProcInfo | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    rest = stat[stat.rindex(")") + 2:].split()
    return ProcInfo(pid, int(rest[1]), int(rest[2]), rest[0], int(rest[19]))


def alive(pid: int, start: int) -> bool:
    """The process ``pid`` that started at ``start`` still runs (not a zombie)."""
    now = info(pid)
    return now is not None and now.start == start and now.running


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def children_of(pid: int) -> list[ProcInfo]:
    found = []
    for candidate in all_pids():
        pi = info(candidate)
        if pi is not None and pi.ppid == pid and pi.running:
            found.append(pi)
    return found


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def tagged(run_id: str) -> list[ProcInfo]:
    """Live processes (zombies aside) whose environment has ``CHAOS_RUN=run_id``."""
    needle = f"{RUN_VAR}={run_id}".encode()
    me = os.getpid()
    found = []
    for pid in all_pids():
        if pid == me:
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            pi = info(pid)
            if pi is not None and pi.running:
                found.append(pi)
    return found


def kill(pid: int, start: int, sig: int = signal.SIGKILL) -> bool:
    """Signal the process ``pid`` only if it is still the one that started at ``start``."""
    if not alive(pid, start):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
        return True
    return False


class Spawned:
    """A process the suite started, its output in a log file."""

    def __init__(self, role: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.role = role
        self.log_path = log
        self._log = open(log, "ab")  # noqa: SIM115 - closed in reap()
        self.proc = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=ROOT)
        self.pid = self.proc.pid
        pi = info(self.pid)
        self.start = pi.start if pi is not None else 0

    def running(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def reap(self, timeout: float = 15.0) -> int:
        try:
            code = self.proc.wait(timeout)
        finally:
            self._log.close()
        return code

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


PYTHON = sys.executable
