"""Baseline for ipc/payload: the fastest pipe echo Python does with our framing.

Same framing (4-byte length + msgspec MessagePack of the ``spirit_gpu.protocol.ipc``
union) and the same pipe set-up as the supervisor (uvloop parent with pipe
transports and 1 MiB pipes, blocking child), but nothing else: the parent
reads into one reusable buffer (``BufferedProtocol``), the child reads with
``os.readv`` into one reusable buffer and answers each ``Run`` with a
``Done`` carrying the same bytes, in one ``write`` per loop of whatever it read.

``python benchmarks/pipe_echo.py --child`` is the child side (fds from argv).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sys
import time
from collections.abc import Awaitable, Callable

from spirit_gpu.protocol import ipc

PIPE_SIZE = 1 << 20


def child_main(rfd: int, wfd: int) -> None:
    buf = bytearray(PIPE_SIZE)
    view = memoryview(buf)
    frames = ipc.FrameBuffer()
    while True:
        n = os.readv(rfd, (buf,))
        if not n:
            return
        out = []
        for msg in frames.feed(view[:n]):
            if isinstance(msg, ipc.Stop):
                return
            if isinstance(msg, ipc.Run):
                out.append(ipc.encode(ipc.Done(msg.job, 200, msg.body)))
        if out:
            ipc.write_all(wfd, out[0] if len(out) == 1 else b"".join(out))


class _Reader(asyncio.BufferedProtocol):
    def __init__(self, echo: RawEcho) -> None:
        self.echo = echo
        self.frames = ipc.FrameBuffer()
        self.buf = bytearray(PIPE_SIZE)
        self.view = memoryview(self.buf)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        waiters = self.echo.waiters
        for msg in self.frames.feed(self.view[:nbytes]):
            fut = waiters.pop(msg.job, None)  # type: ignore[union-attr]
            if fut is not None:
                fut.set_result(msg.body)  # type: ignore[union-attr]


class RawEcho:
    def __init__(self) -> None:
        self.waiters: dict[int, asyncio.Future[bytes]] = {}
        self.next = 0
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        down_r, down_w = os.pipe()
        up_r, up_w = os.pipe()
        for fd in (down_w, up_w):
            try:
                fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)
            except OSError:
                pass
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--child", str(down_r), str(up_w),
            pass_fds=(down_r, up_w), stdin=asyncio.subprocess.DEVNULL)
        os.close(down_r)
        os.close(up_w)
        loop = asyncio.get_running_loop()
        self._rt, _ = await loop.connect_read_pipe(lambda: _Reader(self),
                                                   os.fdopen(up_r, "rb", buffering=0))
        self._wt, _ = await loop.connect_write_pipe(asyncio.Protocol,
                                                    os.fdopen(down_w, "wb", buffering=0))

    def roundtrip(self, body: bytes) -> asyncio.Future[bytes]:
        self.next += 1
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiters[self.next] = fut
        self._wt.write(ipc.encode(ipc.Run(self.next, "r", "sync", "", body)))
        return fut

    async def close(self) -> None:
        self._wt.write(ipc.encode(ipc.Stop()))
        self._wt.close()
        assert self.proc is not None
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        self._rt.close()


Call = Callable[[bytes], Awaitable[bytes]]


async def sequential(call: Call, body: bytes, n: int) -> float:
    """Seconds per round trip, one in flight."""
    t0 = time.perf_counter()
    for _ in range(n):
        await call(body)
    return (time.perf_counter() - t0) / n


async def pipelined(call: Call, body: bytes, n: int, depth: int) -> float:
    """Round trips per second with ``depth`` in flight (``n`` in all)."""
    left = n

    async def lane() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await call(body)

    t0 = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(depth)))
    return n / (time.perf_counter() - t0)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--child":
    child_main(int(sys.argv[2]), int(sys.argv[3]))
