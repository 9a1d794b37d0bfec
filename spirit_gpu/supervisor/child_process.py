"""One handler process as the supervisor sees it: spawn, pipe I/O, exit."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from spirit_gpu.protocol import ipc

_PIPE_SIZE = 1 << 20  # bigger pipes move large payloads in fewer wake-ups
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (out of memory, or killed from outside)" if name == "SIGKILL" else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {returncode}"


class _Reader(asyncio.Protocol):
    def __init__(self, child: ChildProcess) -> None:
        self.child = child
        self.frames = ipc.FrameBuffer()

    def data_received(self, data: bytes) -> None:
        for msg in self.frames.feed(data):
            self.child.on_message(self.child, msg)

    def connection_lost(self, exc: Exception | None) -> None:
        # End of stream: the process closed its pipe, i.e. it is exiting. Its
        # teardown (freeing GPU memory, say) can take a while before it can be
        # reaped; it must not be handed another job meanwhile.
        self.child.eof.set()
        if self.child.state in ("starting", "ready"):
            self.child.state = "lost"


class ChildProcess:
    """States: starting -> ready -> (stopping | lost) -> dead.

    ``lost``: its pipe closed unasked (it is exiting); ``dead``: reaped.
    """

    def __init__(self, cid: int, on_message: Callable[[ChildProcess, ipc.Message], None]) -> None:
        self.cid = cid
        self.on_message = on_message
        self.state = "starting"
        self.pid = 0
        self.proc: asyncio.subprocess.Process | None = None
        self._writer: asyncio.WriteTransport | None = None
        self._reader: asyncio.ReadTransport | None = None
        self.eof = asyncio.Event()
        self.jobs: dict[int, Any] = {}
        self.jobs_done = 0
        self.last_seen = time.monotonic()
        self.idle_since = time.monotonic()
        self.started_at = time.monotonic()
        self.fatal = ""
        self.was_ready = False
        self.kill_reason = ""
        self._out: list[bytes] = []
        # cached: asyncio.get_running_loop() costs a getpid() syscall on 3.11
        self._loop = asyncio.get_running_loop()

    async def spawn(self, script: str, args: list[str], env: dict[str, str],
                    beat_interval: float) -> None:
        down_r, down_w = os.pipe()
        up_r, up_w = os.pipe()
        for fd in (down_w, up_w):
            try:
                fcntl.fcntl(fd, F_SETPIPE_SZ, _PIPE_SIZE)
            except OSError:
                pass
        child_env = dict(env, SPIRIT_CHILD_FDS=f"{down_r},{up_w}",
                         SPIRIT_BEAT_INTERVAL=str(beat_interval))
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "spirit_gpu.child", script, *args,
                pass_fds=(down_r, up_w), env=child_env, stdin=asyncio.subprocess.DEVNULL,
                # terminal signals (Ctrl-C) go to the supervisor alone; it decides
                start_new_session=True)
        finally:
            os.close(down_r)
            os.close(up_w)
        self.pid = self.proc.pid
        loop = self._loop
        self._reader, _ = await loop.connect_read_pipe(
            lambda: _Reader(self), os.fdopen(up_r, "rb", buffering=0))
        self._writer, _ = await loop.connect_write_pipe(
            asyncio.Protocol, os.fdopen(down_w, "wb", buffering=0))

    def send(self, msg: ipc.Message, alone: bool = False) -> None:
        """Queue a frame; what one loop turn queues goes out in one write.

        ``alone``: nothing else is in flight to this child, so there is nothing
        to batch with and the frame goes out now (one loop turn sooner).
        """
        out = self._out
        if alone and not out:
            if self._writer is not None and not self._writer.is_closing():
                self._writer.write(ipc.encode(msg))
            return
        if not out:
            self._loop.call_soon(self._flush)
        out.append(ipc.encode(msg))
        if len(out) >= ipc.FLUSH_EVERY:
            self._flush()

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self._writer is not None and not self._writer.is_closing() and out:
            self._writer.write(out[0] if len(out) == 1 else b"".join(out))

    def kill(self, reason: str = "") -> None:
        if reason and not self.kill_reason:
            self.kill_reason = reason
        if self.proc is not None and self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """Ask for a clean exit after the running jobs."""
        if self.state != "dead":
            self.state = "stopping"
            self.send(ipc.Stop())

    async def wait(self) -> int:
        assert self.proc is not None
        code = await self.proc.wait()
        try:  # the last frames (e.g. a Done sent before a clean exit) may still be in the pipe
            await asyncio.wait_for(self.eof.wait(), 0.5)
        except TimeoutError:
            pass
        self.close()
        return code

    def close(self) -> None:
        for transport in (self._writer, self._reader):
            if transport is not None:
                transport.close()
