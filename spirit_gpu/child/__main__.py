"""Handler process bootstrap: ``python -m spirit_gpu.child SCRIPT [ARGS...]``.

Started only by the supervisor, which passes the pipe fds in SPIRIT_CHILD_FDS.
Runs the user's script as ``__main__``; its call to ``start()`` then serves
the pipe and never returns.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys
import traceback
from typing import NoReturn

from spirit_gpu.child import channel as channel_mod
from spirit_gpu.protocol import ipc


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: gone when the supervisor is
    except (OSError, AttributeError):
        pass  # not Linux: the pipe-EOF watchdog in the reader thread still applies


def _guard_group(keep_closed: tuple[int, ...]) -> None:
    """Fork a guard that kills this process group when this process dies.

    The supervisor kills a handler's whole group (the handler starts a session of
    its own), but when the supervisor itself is SIGKILLed the handler dies by
    PR_SET_PDEATHSIG and nobody is left to end what the handler started (a model
    server, a tokenizer pool). The guard's own death signal fires when this
    process dies, however it dies, and ends the group. It is forked before the
    script runs (a small copy-on-write process) and holds none of the pipes.
    """
    handler_pid = os.getpid()  # (not getppid() in the guard: by then it may be gone)
    try:
        pid = os.fork()
    except OSError:
        return  # no guard: the supervisor still kills the group when it can
    if not pid:
        _guard(handler_pid, keep_closed)


def _guard(handler_pid: int, keep_closed: tuple[int, ...]) -> NoReturn:
    """The guard's life: wait for the handler process to die, then kill the group."""
    try:
        for fd in keep_closed:
            os.close(fd)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, lambda *_: os.killpg(0, signal.SIGKILL))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGUSR1)  # PR_SET_PDEATHSIG, for the handler process
        if os.getppid() != handler_pid:  # it died before the signal was armed
            os.killpg(0, signal.SIGKILL)
        while True:
            signal.pause()
    finally:
        os._exit(0)


def main() -> None:
    fds = os.environ.pop("SPIRIT_CHILD_FDS", "")
    if not fds or len(sys.argv) < 2:
        sys.exit("spirit_gpu.child is started by the supervisor: "
                 "run `python -m spirit_gpu.supervisor main.py` instead")
    read_fd, write_fd = (int(x) for x in fds.split(","))
    _die_with_parent()
    if os.getppid() == 1:  # the supervisor died before the death signal was armed
        os._exit(0)
    if os.getpid() == os.getpgrp():  # our own group (the supervisor's start): guard it
        _guard_group((read_fd, write_fd))
    max_frame = int(os.environ.pop("SPIRIT_CHILD_MAX_FRAME", "") or ipc.DEFAULT_MAX_FRAME)
    chan = channel_mod.Channel(read_fd, write_fd, max_frame)
    channel_mod.CHANNEL = chan
    chan.start_beats(float(os.environ.pop("SPIRIT_BEAT_INTERVAL", "") or 1.0))
    script = os.path.abspath(sys.argv[1])
    sys.argv = [script, *sys.argv[2:]]
    sys.path.insert(0, os.path.dirname(script))
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if exc.code in (0, None):
            message = f"{sys.argv[0]} exited before calling spirit_gpu.start()"
        else:
            message = f"{sys.argv[0]} exited with {exc.code!r} before calling spirit_gpu.start()"
        chan.send(ipc.Fatal(message))
        channel_mod.exit_process(3)
    except BaseException:
        chan.send(ipc.Fatal(f"{script} failed to import:\n{traceback.format_exc().rstrip()}"))
        channel_mod.exit_process(3)
    chan.send(ipc.Fatal(f"{script} finished without calling spirit_gpu.start()"))
    channel_mod.exit_process(3)


if __name__ == "__main__":
    main()
