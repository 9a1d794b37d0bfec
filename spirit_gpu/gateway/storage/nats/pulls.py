"""Pulls: one serverless id's pull requests from this replica, on one subscription.

A pull with an inbox of its own costs a SUB and an UNSUB besides the request
(in the client and in the server, which rebuilds its subject cache); a link
pulls for every job. Here every pull of a consumer has its own reply subject
under one wildcard subscription. The server ends a pull that did not fill its
batch with a status message on that reply subject; deliveries, though, carry
their stream subject, so they go to the oldest open pull that wants more: the
server serves a consumer's pulls first come, first served, and this replica
sent its pulls in that order on one connection.

A pull given up (its caller cancelled: a worker went away) stays open at the
server until it expires, and would take the next job. So the subscription it
was made under is retired: later pulls get a new one, and the old one is
dropped once no open pull uses it, which makes the server forget the pulls
under it (no interest). A job handed to a pull that gave up is no longer
queued as the server counts (``num_pending``); it is in flight until acked or
redelivered. A delivery that arrives for a given-up pull meanwhile is handed
back at once (``-NAK``) rather than left to its lease. Pulls and deliveries go
over the store's lean connection
(``wire``); a delivery is handed on as a ``Delivery``: what its ack subject says.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import msgspec
import nats.errors

from spirit_gpu.gateway.storage.nats.wire import Wire, new_inbox, status_of

NO_MESSAGE = ("404", "408")  # the pull ended empty-handed: nothing queued, or expired


class Delivery(msgspec.Struct):
    """A job delivered by a consumer, and what its ack subject says of it."""

    data: bytes
    reply: str  # the ack subject
    delivered: int  # times delivered, this one included
    sequence: int  # in the stream
    pending: int  # queued behind it when it was delivered


def delivery(data: bytes, reply: str) -> Delivery:
    """``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.
    <pending>``, or the newer form with a domain and an account hash after ACK and a
    token at the end."""
    tokens = reply.split(".")
    at = 4 if len(tokens) == 9 else 6
    if len(tokens) != 9 and len(tokens) < 11:
        raise ValueError(f"not a JetStream ack subject: {reply!r}")
    return Delivery(data, reply, delivered=int(tokens[at]), sequence=int(tokens[at + 1]),
                    pending=int(tokens[at + 4]))


class _Pull:
    __slots__ = ("want", "got", "done", "trouble", "sub")

    def __init__(self, want: int, done: asyncio.Future[None], sub: int) -> None:
        self.want = want
        self.sub = sub  # the subscription its reply subject is under
        self.got: list[Delivery] = []
        self.done = done
        self.trouble = False  # ended by a status other than "nothing for you"

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


class Puller:
    def __init__(self, wire: Wire, subject: str) -> None:
        self.wire = wire
        self.subject = subject  # the consumer's $JS.API.CONSUMER.MSG.NEXT subject
        self._inbox = new_inbox()
        self._ids = itertools.count(1)
        self._open: dict[str, _Pull] = {}  # by reply subject, oldest first
        self._sid = 0
        self._retired: set[int] = set()  # subscriptions to drop once their pulls end
        self._stopped = False  # shutting down: pulls end now with what they have

    async def start(self) -> None:
        self._sid = self.wire.subscribe(f"{self._inbox}.*", self._on_msg)
        self.wire.on_lost.append(self._lost)

    def _lost(self) -> None:
        """The connection dropped, and the server forgot these pulls with it."""
        pulls, self._open = self._open, {}
        for pull in pulls.values():
            pull.trouble = True
            pull.finish()

    def _on_msg(self, subject: str, reply: str, headers: bytes, data: bytes) -> None:
        status = status_of(headers)
        if status or not reply:
            pull = self._open.pop(subject, None)
            if pull is not None:
                pull.trouble = status not in NO_MESSAGE  # e.g. 409: leader changed
                pull.finish()
            return
        try:
            msg = delivery(data, reply)
        except ValueError:
            return  # (nothing a consumer sends)
        for open_reply, pull in self._open.items():
            if len(pull.got) < pull.want:
                pull.got.append(msg)
                if len(pull.got) >= pull.want:
                    del self._open[open_reply]  # (and out of the loop at once)
                    pull.finish()
                return
        self._hand_back(msg)

    def _hand_back(self, msg: Delivery) -> None:
        """Back to the queue now, for the next pull anywhere (not after its lease)."""
        with contextlib.suppress(nats.errors.Error):
            self.wire.publish(msg.reply, b"-NAK")

    async def pull(self, request: dict[str, object], want: int,
                   timeout: float) -> tuple[list[Delivery], bool]:
        """Up to ``want`` deliveries, and whether the pull ended in trouble. Raises
        nats' TimeoutError when the server said nothing for ``timeout`` s."""
        reply = f"{self._inbox}.{next(self._ids)}"
        loop = asyncio.get_running_loop()
        pull = _Pull(want, loop.create_future(), self._sid)
        self._open[reply] = pull
        timer = loop.call_later(timeout, pull.finish)
        try:
            self.wire.publish(self.subject, msgspec.json.encode(request), reply=reply)
            await pull.done
        except BaseException:
            if self._open.pop(reply, None) is not None:  # still open at the server
                self._retire(pull.sub)
            self._release(pull.sub)
            for msg in pull.got:  # not handed over
                self._hand_back(msg)
            raise
        finally:
            timer.cancel()
        unanswered = self._open.pop(reply, None) is not None
        if unanswered and self._stopped:
            self._retire(pull.sub)  # still open at the server: given up
        self._release(pull.sub)
        if unanswered and not pull.got and not self._stopped:
            raise nats.errors.TimeoutError
        return pull.got, pull.trouble

    def stop(self) -> None:
        """Shutting down: open pulls end now with what they have (none waits out its
        expiry), and later ones ask only for what is there."""
        self._stopped = True
        for pull in list(self._open.values()):
            pull.finish()

    def _retire(self, sub: int) -> None:
        """Later pulls go under a new subscription; ``sub`` is dropped once unused."""
        if sub != self._sid or not self._sid:
            return
        self._retired.add(sub)
        self._inbox = new_inbox()
        self._sid = self.wire.subscribe(f"{self._inbox}.*", self._on_msg)

    def _release(self, sub: int) -> None:
        if sub in self._retired and all(p.sub != sub for p in self._open.values()):
            self._retired.discard(sub)
            self.wire.unsubscribe(sub)

    async def close(self) -> None:
        for pull in self._open.values():
            pull.finish()
        self._open.clear()
        for sub in (*self._retired, self._sid):
            if sub:
                self.wire.unsubscribe(sub)
        self._retired.clear()
        with contextlib.suppress(ValueError):
            self.wire.on_lost.remove(self._lost)
