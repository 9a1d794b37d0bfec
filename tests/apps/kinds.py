"""One handler of the kind named by APP_KIND."""

import asyncio
import os

from spirit_gpu import start


def sync_handler(request, env):
    return {"kind": "sync", "x": request["input"].get("x")}


def gen_handler(request, env):
    for i in range(request["input"].get("n", 3)):
        yield {"i": i}


async def async_handler(request, env):
    await asyncio.sleep(request["input"].get("sleep", 0))
    return {"kind": "async", "pid": os.getpid(), "id": env.request_id}


async def agen_handler(request, env):
    for i in range(request["input"].get("n", 3)):
        await asyncio.sleep(0)
        yield i


HANDLERS = {"sync": sync_handler, "generator": gen_handler, "async": async_handler,
            "async_generator": agen_handler}

start({"handler": HANDLERS[os.environ.get("APP_KIND", "sync")],
       "concurrency_modifier": lambda current: int(os.environ.get("APP_CONCURRENCY", "1"))})
