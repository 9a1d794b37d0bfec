"""PID 1 duties in a container: forward signals to the supervisor, reap zombies."""

from __future__ import annotations

import os
import signal
import sys
from typing import NoReturn

_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
              signal.SIGUSR2)


def run_as_init() -> None:
    """Fork: the child returns and becomes the supervisor; this process stays PID 1.

    Orphans re-parented to PID 1 (a handler's own subprocesses, for example)
    are reaped here, which the supervisor's child watcher cannot do.
    """
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        return
    _reap_forever(pid)


def _reap_forever(supervisor: int) -> NoReturn:
    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(supervisor, signum)
        except ProcessLookupError:
            pass

    for sig in _FORWARDED:
        signal.signal(sig, forward)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            sys.exit(0)
        except InterruptedError:
            continue
        if pid == supervisor:
            code = os.waitstatus_to_exitcode(status)
            sys.exit(128 - code if code < 0 else code)
