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

MAX_FRAME = (1 << 32) - 1  # what a 4-byte length can say: the wire's own bound
# What either end accepts unless told otherwise (WorkerConfig.max_frame_mb): a
# larger frame is refused before its body is buffered, so a process that writes
# a 4 GB length prefix costs nothing. A little above the gateway's default
# request and result limits.
DEFAULT_MAX_FRAME = 64 << 20
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


class FrameError(ValueError):
    """A frame this end must not accept: longer than its limit, or not a message.
    The stream cannot be trusted after it: the peer is to be cut off."""


def decode(payload: bytes | memoryview) -> Message:
    return _decoder.decode(payload)


def _decode_frame(payload: bytes | memoryview) -> Message:
    try:
        return _decoder.decode(payload)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise FrameError(f"malformed frame: {exc}") from None


def _check_size(size: int, max_frame: int) -> None:
    if size > max_frame:
        raise FrameError(f"frame of {size} bytes, over the {max_frame}-byte limit")


class FrameBuffer:
    """Reassembles frames from arbitrary chunks of a byte stream.

    ``feed`` raises ``FrameError`` on a frame longer than ``max_frame`` (as soon as
    its length prefix arrives: nothing past the limit is ever buffered) or one that
    does not decode; the buffer is emptied then.
    """

    __slots__ = ("_buf", "max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes | memoryview) -> list[Message]:
        buf = self._buf
        try:
            if buf:
                buf += data
                return self._parse(buf, buf, self.max_frame)
            # nothing held back: parse the caller's bytes directly, keep only a tail
            return self._parse(data, buf, self.max_frame)
        except FrameError:
            self._buf = bytearray()
            raise

    @staticmethod
    def _parse(source: bytes | bytearray | memoryview, buf: bytearray,
               max_frame: int) -> list[Message]:
        out: list[Message] = []
        pos = 0
        end = len(source)
        with memoryview(source) as view:  # released before the buffer is resized
            while end - pos >= 4:
                (size,) = _LEN.unpack_from(view, pos)
                _check_size(size, max_frame)
                if end - pos - 4 < size:
                    break
                out.append(_decode_frame(view[pos + 4:pos + 4 + size]))
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


def read_message(fd: int, max_frame: int = DEFAULT_MAX_FRAME) -> Message | None:
    """Blocking read of one message; None at end of stream; ``FrameError`` as ``feed``."""
    head = _read_exact(fd, 4)
    if head is None:
        return None
    (size,) = _LEN.unpack(head)
    _check_size(size, max_frame)
    body = _read_exact(fd, size) if size else b""
    if body is None:
        return None
    return _decode_frame(body)


def write_all(fd: int, data: bytes | memoryview) -> None:
    written = os.write(fd, data)  # the usual case: all of it at once
    if written == len(data):
        return
    view = memoryview(data)[written:]
    while view:
        written = os.write(fd, view)
        view = view[written:]
