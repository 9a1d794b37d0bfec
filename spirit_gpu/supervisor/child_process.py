"""One handler process as the supervisor sees it: spawn, pipe I/O, exit."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from spirit_gpu.net.batch_writer import BatchWriter
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


def _join(frames: list[bytes]) -> bytes:
    return frames[0] if len(frames) == 1 else b"".join(frames)


class _Reader(asyncio.Protocol):
    def __init__(self, child: ChildProcess, max_frame: int) -> None:
        self.child = child
        self.frames = ipc.FrameBuffer(max_frame)
        self.broken = False

    def data_received(self, data: bytes) -> None:
        if self.broken:  # after a bad frame nothing more from it is believed
            return
        try:
            messages = self.frames.feed(data)
        except ipc.FrameError as exc:
            self.broken = True
            self.child.protocol_failed(f"sent a {exc}")
            return
        for msg in messages:
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
        # cached: asyncio.get_running_loop() costs a getpid() syscall on 3.11
        self._loop = asyncio.get_running_loop()
        self.last_seen = self.idle_since = self.started_at = self._loop.time()
        self.fatal = ""
        self.was_ready = False
        self.kill_reason = ""
        self.killed_on_purpose = False  # for a job's cancel or timeout: not a crash
        self.protocol_error = ""  # e.g. "sent a malformed frame: ...": it was killed for it
        # frames one loop turn queues go out in one write, at most FLUSH_EVERY at a time
        self._out: BatchWriter[bytes] = BatchWriter(_join, self._write,
                                                    max_batch=ipc.FLUSH_EVERY)

    async def spawn(self, script: str, args: list[str], env: dict[str, str],
                    beat_interval: float, max_frame: int = ipc.DEFAULT_MAX_FRAME) -> None:
        down_r, down_w = os.pipe()
        up_r, up_w = os.pipe()
        for fd in (down_w, up_w):
            try:
                fcntl.fcntl(fd, F_SETPIPE_SZ, _PIPE_SIZE)
            except OSError:
                pass
        child_env = dict(env, SPIRIT_CHILD_FDS=f"{down_r},{up_w}",
                         SPIRIT_BEAT_INTERVAL=str(beat_interval),
                         SPIRIT_CHILD_MAX_FRAME=str(max_frame))
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
        # writing first: its Hello may be read as soon as the read side is connected,
        # and the Run answering it must have a pipe to go down (else it is lost)
        self._writer, _ = await loop.connect_write_pipe(
            asyncio.Protocol, os.fdopen(down_w, "wb", buffering=0))
        self._reader, _ = await loop.connect_read_pipe(
            lambda: _Reader(self, max_frame), os.fdopen(up_r, "rb", buffering=0))

    def send(self, msg: ipc.Message, alone: bool = False) -> None:
        """Queue a frame; what one loop turn queues goes out in one write.

        ``alone``: nothing else is in flight to this child, so there is nothing
        to batch with and the frame goes out now (one loop turn sooner).
        """
        self._out.send(ipc.encode(msg), alone)

    def _write(self, data: bytes) -> None:
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(data)  # a pipe transport buffers: never waits here

    def protocol_failed(self, what: str) -> None:
        """It broke the pipe protocol (a frame over the limit, or one that does not
        decode): the stream cannot be trusted any more, so it is killed."""
        if not self.protocol_error:
            self.protocol_error = what
        self.kill(what)

    def kill(self, reason: str = "", on_purpose: bool = False) -> None:
        """SIGKILL to its whole process group (anything its handler forked too);
        ``on_purpose``: the supervisor ends it for a job's sake (cancel, timeout), so
        its exit is expected, not a crash."""
        if reason and not self.kill_reason:
            self.kill_reason = reason
            self.killed_on_purpose = on_purpose
        if self.proc is not None and self.proc.returncode is None:
            self.kill_group()

    def kill_group(self) -> None:
        """SIGKILL its process group. It leads a session of its own (spawned with
        start_new_session), so the group's id is its pid; once it is reaped this
        still reaches what it forked (Linux reuses no pid while its group lives)."""
        if not self.pid:
            return
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
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
        self.kill_group()  # a grandchild its handler forked must not outlive it
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
