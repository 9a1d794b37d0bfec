"""The child's end of the pipe pair.

The main thread reads the pipe itself (no hand-off between threads on the hot
path). A beat thread sends ``Beat`` every interval so the supervisor knows the
process is alive even while a handler runs for hours; a process that is
stopped, or stuck in C code holding the GIL, stops beating and is killed.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import NoReturn

from spirit_gpu.handlers import error_body
from spirit_gpu.protocol import ipc

CHANNEL: Channel | None = None  # set by the child bootstrap before the script runs
# One reusable read buffer: os.read(fd, 1 MiB) would map and unmap a fresh
# megabyte per message (three syscalls and a page fault each time).
READ_SIZE = 1 << 20


def _too_large(msg: ipc.Message, size: int, limit: int) -> ipc.Message:
    """What goes instead of a frame over the limit: the supervisor would kill a
    process sending it, so a too-large result fails its job and nothing more."""
    why = (f"{type(msg).__name__.lower()} too large: {size} bytes, the limit between "
           f"supervisor and handler is {limit} bytes (SPIRIT_MAX_FRAME_MB)")
    if isinstance(msg, ipc.Done):
        return ipc.Done(msg.job, 500, error_body(why), why, msg.recycle)
    if isinstance(msg, ipc.Chunk):
        return ipc.Chunk(msg.job, msg.seq, error_body(why))
    if isinstance(msg, ipc.Fatal):
        return ipc.Fatal(msg.message[:limit // 2])
    if isinstance(msg, ipc.StartChecked):
        return ipc.StartChecked(msg.ok, msg.error[:limit // 2])
    return ipc.Fatal(why)


class Channel:
    def __init__(self, read_fd: int, write_fd: int,
                 max_frame: int = ipc.DEFAULT_MAX_FRAME) -> None:
        self.read_fd = read_fd
        self._wfd = write_fd
        self._wlock = threading.Lock()
        self.max_frame = max_frame
        self._frames = ipc.FrameBuffer(max_frame)
        self._rbuf = bytearray(READ_SIZE)
        self._rview = memoryview(self._rbuf)
        self.beat_interval = 1.0
        self._beat_changed = threading.Event()


    def send(self, msg: ipc.Message) -> None:
        self.write(self.frame(msg))

    def frame(self, msg: ipc.Message) -> bytes:
        """``msg`` encoded, or a stand-in saying it was too large (``_too_large``)."""
        data = ipc.encode(msg)
        if len(data) - 4 > self.max_frame:
            data = ipc.encode(_too_large(msg, len(data) - 4, self.max_frame))
        return data

    def write(self, data: bytes) -> None:
        with self._wlock:
            try:
                ipc.write_all(self._wfd, data)
            except (BrokenPipeError, OSError):
                _supervisor_gone()

    def read_blocking(self) -> list[ipc.Message]:
        """Block until at least one whole message arrived; exit at end of stream."""
        while True:
            try:
                n = os.readv(self.read_fd, (self._rbuf,))
            except InterruptedError:
                continue
            except OSError:
                n = 0
            if not n:
                _supervisor_gone()
            messages = self._feed(n)
            if messages:
                return messages

    def read_available(self) -> list[ipc.Message]:
        """What a non-blocking read finds now (the async runtime's reader callback)."""
        try:
            n = os.readv(self.read_fd, (self._rbuf,))
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            n = 0
        if not n:
            _supervisor_gone()
        return self._feed(n)

    def _feed(self, n: int) -> list[ipc.Message]:
        try:
            return self._frames.feed(self._rview[:n])
        except ipc.FrameError as exc:  # only a broken supervisor sends one
            print(f"spirit_gpu handler process: the supervisor sent a {exc}", file=sys.stderr)
            _exit(2)

    def set_beat_interval(self, interval: float) -> None:
        """start()'s ping_interval: the beat thread switches to it at once."""
        if interval != self.beat_interval:
            self.beat_interval = interval
            self._beat_changed.set()

    def start_beats(self, interval: float) -> None:
        self.beat_interval = interval

        def beat() -> None:
            seq = 0
            while True:
                if self._beat_changed.wait(self.beat_interval):
                    self._beat_changed.clear()
                    continue
                seq += 1
                self.send(ipc.Beat(seq))

        threading.Thread(target=beat, name="spirit-beat", daemon=True).start()


def _exit(code: int) -> NoReturn:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _supervisor_gone() -> NoReturn:
    """Pipe closed: the supervisor is gone; a handler process never outlives it."""
    _exit(0)


def exit_process(code: int) -> NoReturn:
    _exit(code)
