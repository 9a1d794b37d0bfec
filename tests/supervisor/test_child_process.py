"""One real handler process driven through ChildProcess, the supervisor's end of the pipes."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from spirit_gpu.protocol import ipc
from spirit_gpu.supervisor.child_process import ChildProcess
from tests.conftest import APPS, ROOT


async def test_a_run_sent_as_soon_as_the_hello_is_read_reaches_the_process(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A loaded supervisor may read the Hello before spawn() returns; the Run that answers
    it must not be lost for want of a connected write pipe (the job would never end)."""
    loop = asyncio.get_running_loop()
    hello = asyncio.Event()
    connect_read_pipe = loop.connect_read_pipe

    async def read_until_hello(*args: Any, **kwargs: Any) -> Any:
        # the read side is connected and the Hello handled before spawn() goes on
        connected = await connect_read_pipe(*args, **kwargs)
        await asyncio.wait_for(hello.wait(), 30)
        return connected

    monkeypatch.setattr(loop, "connect_read_pipe", read_until_hello)
    done: asyncio.Future[ipc.Done] = loop.create_future()

    def on_message(child: ChildProcess, msg: ipc.Message) -> None:
        if isinstance(msg, ipc.Hello):
            hello.set()
            child.send(ipc.Run(1, "r1", "sync", "", b'{"input": {"x": 7}}'), alone=True)
        elif isinstance(msg, ipc.Done) and not done.done():
            done.set_result(msg)

    child = ChildProcess(1, on_message)
    env = dict(os.environ, PYTHONPATH=str(ROOT), APP_KIND="sync")
    await child.spawn(str(APPS / "kinds.py"), [], env, beat_interval=1.0)
    try:
        answer = await asyncio.wait_for(done, 30)
        assert (answer.job, answer.status_code, answer.body) == (
            1, 200, b'{"kind":"sync","x":7}')
    finally:
        child.kill()
        await child.wait()
