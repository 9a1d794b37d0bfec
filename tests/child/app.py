"""A handler process script for tests/child: start() keys come from APP_* env vars."""

import asyncio
import gc
import os

from spirit_gpu import start


def handler(request, env):
    return {"agent_url": env.agent_url, "request_id": env.request_id, "pid": os.getpid(),
            "frozen": gc.get_freeze_count()}


async def slow(request, env):
    await asyncio.sleep(request["input"].get("sleep", 0))
    return {"done": True}


config = {"handler": slow if os.environ.get("APP_ASYNC") else handler}
if os.environ.get("APP_PING"):
    config["ping_interval"] = float(os.environ["APP_PING"])
start(config)
