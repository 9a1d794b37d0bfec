"""An async handler that sleeps input.sleep seconds (to cancel it while running)."""

import asyncio

from spirit_gpu import start


async def handler(request: dict, env: object):  # type: ignore[no-untyped-def, type-arg]
    await asyncio.sleep(float(request["input"].get("sleep", 0)))
    return {"slept": request["input"].get("sleep", 0)}


start({"handler": handler})
