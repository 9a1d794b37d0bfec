"""Supervisor <-> child messages and their framing.

Every message is one ``msgspec.Struct`` of the tagged union ``Message``; a
frame is a 4-byte big-endian length followed by the MessagePack encoding.
Request and result bodies travel as raw ``bytes``: only the child decodes a
request, and results arrive already encoded, so the supervisor never
re-encodes a payload.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import msgspec

MAX_FRAME = 1 << 31  # a 4-byte length cannot say more; 20 MB bodies fit easily
# Frames one loop turn produces go out in one write, but no more than this many
# per write (both ends): the other side starts on the first ones meanwhile.
FLUSH_EVERY = 16
_LEN = struct.Struct(">I")


class Run(msgspec.Struct, tag="run", array_like=True):
    """Run one job. ``body`` is the request JSON exactly as the client sent it."""

    job: int
    request_id: str
    mode: str
    webhook: str
    body: bytes


class Cancel(msgspec.Struct, tag="cancel", array_like=True):
    """Cancel a running job (async handlers: its task is cancelled)."""

    job: int
    status_code: int = 499
    reason: str = "cancelled"


class Stop(msgspec.Struct, tag="stop", array_like=True):
    """Finish running jobs, then exit 0."""


class AskConcurrency(msgspec.Struct, tag="ask_concurrency", array_like=True):
    """Run the user's concurrency_modifier with the current value."""

    current: int


class CheckStart(msgspec.Struct, tag="check_start", array_like=True):
    """Proxy mode: run the user's check_start once."""


class Hello(msgspec.Struct, tag="hello", array_like=True):
    """The child imported the script and start() was called: it is ready.

    ``kind`` is sync | generator | async | async_generator | proxy.
    ``options`` holds the JSON-able start() keys the supervisor acts on.
    """

    pid: int
    kind: str
    concurrency: int
    options: dict[str, Any] = {}


class Chunk(msgspec.Struct, tag="chunk", array_like=True):
    """One JSON-encoded item a generator handler yielded, in order."""

    job: int
    seq: int
    data: bytes


class Done(msgspec.Struct, tag="done", array_like=True):
    """A job's result: JSON bytes (or the handler's raw bytes)."""

    job: int
    status_code: int
    body: bytes
    message: str = ""
    recycle: bool = False


class Beat(msgspec.Struct, tag="beat", array_like=True):
    """Sent every beat interval by a thread of its own: the child is alive.

    A child stopped, or stuck in C code holding the GIL, stops beating.
    """

    seq: int


class Concurrency(msgspec.Struct, tag="concurrency", array_like=True):
    value: int


class StartChecked(msgspec.Struct, tag="start_checked", array_like=True):
    ok: bool
    error: str = ""


class Fatal(msgspec.Struct, tag="fatal", array_like=True):
    """This process cannot serve at all (e.g. the script failed to import)."""

    message: str


Message = (Run | Cancel | Stop | AskConcurrency | CheckStart | Hello | Chunk | Done | Beat
           | Concurrency | StartChecked | Fatal)

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)  # type: ignore[arg-type]


def encode(msg: Message) -> bytes:
    """One whole frame: length prefix and MessagePack body."""
    buf = bytearray(4)
    _encoder.encode_into(msg, buf, 4)
    _LEN.pack_into(buf, 0, len(buf) - 4)
    return bytes(buf)


def decode(payload: bytes | memoryview) -> Message:
    return _decoder.decode(payload)


class FrameBuffer:
    """Reassembles frames from arbitrary chunks of a byte stream."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes | memoryview) -> list[Message]:
        buf = self._buf
        if buf:
            buf += data
            return self._parse(buf, buf)
        # nothing held back: parse the caller's bytes directly, keep only a tail
        return self._parse(data, buf)

    @staticmethod
    def _parse(source: bytes | bytearray | memoryview, buf: bytearray) -> list[Message]:
        out: list[Message] = []
        pos = 0
        end = len(source)
        with memoryview(source) as view:  # released before the buffer is resized
            while end - pos >= 4:
                (size,) = _LEN.unpack_from(view, pos)
                if end - pos - 4 < size:
                    break
                out.append(_decoder.decode(view[pos + 4:pos + 4 + size]))
                pos += 4 + size
            if source is not buf:
                if pos < end:
                    buf += view[pos:]
                return out
        if pos:
            del buf[:pos]
        return out


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks: list[bytes] = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def read_message(fd: int) -> Message | None:
    """Blocking read of one message; None at end of stream."""
    head = _read_exact(fd, 4)
    if head is None:
        return None
    (size,) = _LEN.unpack(head)
    body = _read_exact(fd, size) if size else b""
    if body is None:
        return None
    return _decoder.decode(body)


def write_all(fd: int, data: bytes | memoryview) -> None:
    written = os.write(fd, data)  # the usual case: all of it at once
    if written == len(data):
        return
    view = memoryview(data)[written:]
    while view:
        written = os.write(fd, view)
        view = view[written:]
