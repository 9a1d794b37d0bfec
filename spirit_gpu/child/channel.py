"""The child's end of the pipe pair: framed writes and a reader thread.

The reader thread answers liveness pings itself, so a child busy in a long
(GIL-releasing) handler still answers, while one stuck in C code holding the
GIL, or stopped, does not, and is killed by the supervisor.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

from spirit_gpu import ipc

CHANNEL: Channel | None = None  # set by the child bootstrap before the script runs


class Channel:
    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._rfd = read_fd
        self._wfd = write_fd
        self._wlock = threading.Lock()
        self.on_message: Callable[[ipc.Message], None] | None = None

    def send(self, msg: ipc.Message) -> None:
        frame = ipc.encode(msg)
        with self._wlock:
            try:
                ipc.write_all(self._wfd, frame)
            except BrokenPipeError:
                _supervisor_gone()

    def start_reader(self) -> None:
        threading.Thread(target=self._read_forever, name="spirit-ipc-reader",
                         daemon=True).start()

    def _read_forever(self) -> None:
        while True:
            try:
                msg = ipc.read_message(self._rfd)
            except OSError:
                msg = None
            if msg is None:
                _supervisor_gone()
                return
            if isinstance(msg, ipc.Ping):
                self.send(ipc.Pong(msg.seq))
                continue
            handler = self.on_message
            if handler is not None:
                handler(msg)
            elif isinstance(msg, ipc.Stop):  # asked to stop while still importing
                _exit(0)


def _exit(code: int) -> NoReturn:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _supervisor_gone() -> NoReturn:
    """Pipe EOF: the supervisor is gone; a handler process never outlives it."""
    _exit(0)


def exit_process(code: int) -> NoReturn:
    _exit(code)
