"""The proxy registry shared by every replica on NATS.

Each replica keeps its own ``ProxyRegistry``; every register beat and
deregistration a replica receives is published on ``spirit.proxy.reg`` and
applied by the others. So any replica knows every proxy worker of a serverless
id and routes to it over HTTP at the URL the worker registered; a worker's
proxy link, when it dialled one, is used only by the replica it is linked to
(the others reach the same worker at its URL). A replica that starts learns a
worker at its next beat (every few seconds).
"""

from __future__ import annotations

import asyncio

import msgspec
from nats.aio.msg import Msg

from spirit_gpu.gateway.proxy.registry import ProxyRegistry
from spirit_gpu.gateway.storage.nats import names
from spirit_gpu.gateway.storage.nats.store import NatsStorage
from spirit_gpu.log import logger
from spirit_gpu.protocol.proxy import ProxyRegistration


class _Note(msgspec.Struct):
    origin: str
    sid: str
    worker_id: str
    reg: ProxyRegistration | None = None  # None: deregistered


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(_Note).decode


class ProxyShare:
    def __init__(self, storage: NatsStorage, registry: ProxyRegistry) -> None:
        self.storage = storage
        self.registry = registry
        self._applying = False
        self._tasks: set[asyncio.Task[None]] = set()
        registry.on_register = self._registered
        registry.on_deregister = self._deregistered

    async def start(self) -> None:
        await self.storage.nc.subscribe(names.PROXY_SUBJECT, cb=self._on_note)

    def _registered(self, sid: str, reg: ProxyRegistration) -> None:
        self._publish(_Note(self.storage.replica, sid, reg.workerID, reg))

    def _deregistered(self, sid: str, worker_id: str) -> None:
        self._publish(_Note(self.storage.replica, sid, worker_id))

    def _publish(self, note: _Note) -> None:
        if self._applying:  # a note from another replica being applied: not ours to tell
            return
        task = asyncio.create_task(self._send(note))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, note: _Note) -> None:
        try:
            await self.storage.nc.publish(names.PROXY_SUBJECT, _encode(note))
        except Exception as exc:  # noqa: BLE001 - the next beat tells them again
            logger.warn(f"proxy registry: sharing {note.worker_id} failed: {exc!r}")

    async def _on_note(self, msg: Msg) -> None:
        try:
            note = _decode(msg.data)
        except msgspec.DecodeError:
            return
        if note.origin == self.storage.replica:
            return
        self._applying = True
        try:
            if note.reg is None:
                self.registry.deregister(note.sid, note.worker_id)
            else:
                self.registry.register(note.sid, note.reg)
        finally:
            self._applying = False
