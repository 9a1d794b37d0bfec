"""What the worker sent over its link and the gateway has not confirmed yet.

With a gateway that confirms (``stored`` in its Welcome), both ends count the
frames the worker sends on a link, from 1, in the order they are written. The
gateway answers ``Stored(upto)`` once the first ``upto`` were handled; the
frames that carry a job's state (``Metric``, ``Result``, ``Ack``, ``Chunk``)
are kept here until then. A link that dies leaves them here: they are the first
thing written on the next link, to whichever gateway replica it reaches, in
their order. A frame stored twice changes nothing (a chunk counts once per
``seq``, a request's first end wins), so what a dying gateway or connection
took is sent again rather than lost.

Bounds: a frame larger than the gateway reads in one message is never kept
(it is sent once; the gateway fails its request as too large). At most
``max_bytes`` are kept (64 MiB by default); past that the oldest are let go,
with one warning, and are as safe as a frame on a link without confirmations:
sent, and lost if the gateway dies before storing them.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator

from spirit_gpu.log import logger
from spirit_gpu.protocol import link as lp

_STATE_TYPES = frozenset(lp.REQUEST_FRAMES)  # (a set lookup: cheaper than isinstance per frame)
KEEP_BYTES = 64 * 1024 * 1024
FRAME_BYTES = 128  # counted per frame on top of its payload: more than msgpack's framing
RESEND_BYTES = 1024 * 1024  # kept frames are sent again in messages of about this size


class Outgoing:
    """A frame waiting to go out, with the tries it has left (on a link without
    confirmations) and its number on the current link (0: not written on it)."""

    __slots__ = ("frame", "tries", "done", "request_id", "n", "size", "kept")

    def __init__(self, frame: lp.Frame, tries: int, request_id: str,
                 done: asyncio.Future[bool] | None) -> None:
        self.frame = frame
        self.tries = tries
        self.request_id = request_id
        self.done = done
        self.n = 0
        self.size = 0
        self.kept = False


def frame_size(frame: lp.Frame) -> int:
    if isinstance(frame, lp.Result):
        return FRAME_BYTES + len(frame.data) + len(frame.message)
    if isinstance(frame, lp.Chunk):
        return FRAME_BYTES + len(frame.data)
    if isinstance(frame, lp.Metric):
        return FRAME_BYTES + len(frame.message)
    return FRAME_BYTES


class Unconfirmed:
    """The kept frames, in the order they were first written."""

    def __init__(self, max_bytes: int = KEEP_BYTES) -> None:
        self.max_bytes = max_bytes
        self.frames: deque[Outgoing] = deque()
        self.bytes = 0
        self.confirming = False  # the current (or last) link's gateway confirms
        self.max_message = 0  # the largest message that gateway reads (0: not said)
        self.written = 0  # frames written on the current link
        self.none = asyncio.Event()  # nothing is kept
        self.none.set()
        self._over = False  # past max_bytes (warned once until back under)

    def __len__(self) -> int:
        return len(self.frames)

    def new_link(self, confirming: bool, max_message: int) -> list[Outgoing]:
        """A link opened: counting starts over. Returns what to write on it first:
        everything kept, in order (to a gateway that does not confirm, once: then
        ``forget_all`` once it is written)."""
        self.confirming = confirming
        self.max_message = max_message
        self.written = 0
        again = list(self.frames)
        for o in again:
            o.n = 0
        return again

    def writing(self, items: list[Outgoing]) -> None:
        """``items`` are being written on the current link now, in this order."""
        if not self.confirming:
            return
        n = self.written
        for o in items:
            n += 1
            o.n = n
            if not o.kept and type(o.frame) in _STATE_TYPES:
                self._keep(o)
        self.written = n

    def unsent(self, items: list[Outgoing]) -> list[Outgoing]:
        """A write of ``items`` failed on a confirming link: those that carry state are
        kept, to go first on the next link (after the kept ones written before them).
        Returns the others (credits, heartbeats, a frame too large to keep)."""
        rest = []
        for o in items:
            if not o.kept and isinstance(o.frame, lp.REQUEST_FRAMES):
                self._keep(o)
            if not o.kept:
                rest.append(o)
        return rest

    def unwritten(self) -> list[Outgoing]:
        """Kept frames not written on the current link (a write that failed on it)."""
        return [o for o in self.frames if o.n == 0]

    def stored(self, upto: int) -> None:
        """The gateway handled the current link's first ``upto`` frames."""
        frames = self.frames
        kept = self.bytes
        while frames and 0 < frames[0].n <= upto:
            o = frames.popleft()
            o.kept = False
            kept -= o.size
        self.bytes = kept
        if self._over and kept <= self.max_bytes // 2:
            self._over = False
        if not frames:
            self.none.set()

    def messages(self, items: list[Outgoing]) -> Iterator[list[Outgoing]]:
        """``items`` in groups that each fit one message (a large frame alone)."""
        limit = min(self.max_message or RESEND_BYTES, RESEND_BYTES)
        group: list[Outgoing] = []
        size = 0
        for o in items:
            n = o.size or frame_size(o.frame)
            if group and size + n > limit:
                yield group
                group, size = [], 0
            group.append(o)
            size += n
        if group:
            yield group

    def _keep(self, o: Outgoing) -> None:
        o.size = frame_size(o.frame)
        if self.max_message and o.size > self.max_message:
            return  # more than the gateway reads: sent once, never again
        o.kept = True
        self.frames.append(o)
        self.bytes += o.size
        if self.none.is_set():
            self.none.clear()
        if self.bytes <= self.max_bytes:
            return
        let_go = 0
        while self.bytes > self.max_bytes and len(self.frames) > 1:
            self._forget(self.frames.popleft())
            let_go += 1
        if not self._over:
            self._over = True
            logger.warn(f"more than {self.max_bytes} bytes of frames sent over the link await "
                        f"the gateway's confirmation: the oldest {let_go} are let go (a "
                        "gateway that dies before storing them loses them)")

    def _forget(self, o: Outgoing) -> None:
        o.kept = False
        self.bytes -= o.size
        if self._over and self.bytes <= self.max_bytes // 2:
            self._over = False

    def forget_all(self) -> None:
        while self.frames:
            self._forget(self.frames.popleft())
        self.none.set()
