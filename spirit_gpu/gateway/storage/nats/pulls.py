"""Pulls: one serverless id's pull requests from this replica, on one subscription.

A pull with an inbox of its own costs a SUB and an UNSUB besides the request
(in the client and in the server, which rebuilds its subject cache); a link
pulls for every job. Here every pull of a consumer has its own reply subject
under one wildcard subscription. The server ends a pull that did not fill its
batch with a status message on that reply subject; deliveries, though, carry
their stream subject, so they go to the oldest open pull that wants more: the
server serves a consumer's pulls first come, first served, and this replica
sent its pulls in that order on one connection. A delivery nobody here wants
any more (its pull gave up) is handed back at once (``-NAK``) rather than left
to its lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

_STATUS = "Status"
NO_MESSAGE = ("404", "408")  # the pull ended empty-handed: nothing queued, or expired


class _Pull:
    __slots__ = ("want", "got", "done", "trouble")

    def __init__(self, want: int, done: asyncio.Future[None]) -> None:
        self.want = want
        self.got: list[Msg] = []
        self.done = done
        self.trouble = False  # ended by a status other than "nothing for you"

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


class Puller:
    def __init__(self, nc: Client, subject: str) -> None:
        self.nc = nc
        self.subject = subject  # the consumer's $JS.API.CONSUMER.MSG.NEXT subject
        self._inbox = nc.new_inbox()
        self._ids = itertools.count(1)
        self._open: dict[str, _Pull] = {}  # by reply subject, oldest first
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(f"{self._inbox}.*", cb=self._on_msg)

    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get(_STATUS) if msg.headers else None
        if status or not msg.reply:
            pull = self._open.pop(msg.subject, None)
            if pull is not None:
                pull.trouble = status not in NO_MESSAGE  # e.g. 409: leader changed
                pull.finish()
            return
        for reply, pull in self._open.items():
            if len(pull.got) < pull.want:
                pull.got.append(msg)
                if len(pull.got) >= pull.want:
                    del self._open[reply]  # (and out of the loop at once)
                    pull.finish()
                return
        await self._hand_back(msg)

    async def _hand_back(self, msg: Msg) -> None:
        """Back to the queue now, for the next pull anywhere (not after its lease)."""
        with contextlib.suppress(nats.errors.Error):
            await self.nc.publish(msg.reply, b"-NAK")

    async def pull(self, request: dict[str, object], want: int,
                   timeout: float) -> tuple[list[Msg], bool]:
        """Up to ``want`` deliveries, and whether the pull ended in trouble. Raises
        nats' TimeoutError when the server said nothing for ``timeout`` s."""
        reply = f"{self._inbox}.{next(self._ids)}"
        loop = asyncio.get_running_loop()
        pull = _Pull(want, loop.create_future())
        self._open[reply] = pull
        timer = loop.call_later(timeout, pull.finish)
        try:
            await self.nc.publish(self.subject, msgspec.json.encode(request), reply=reply)
            await pull.done
        except BaseException:
            self._open.pop(reply, None)
            for msg in pull.got:  # not handed over
                await self._hand_back(msg)
            raise
        finally:
            timer.cancel()
        if self._open.pop(reply, None) is not None and not pull.got:
            raise nats.errors.TimeoutError
        return pull.got, pull.trouble

    async def close(self) -> None:
        for pull in self._open.values():
            pull.finish()
        self._open.clear()
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
