"""An async handler that sleeps input.sleep seconds (to cancel it while running);
with input.started it first creates that file (the handler is running now)."""

import asyncio
from pathlib import Path

from spirit_gpu import start


async def handler(request: dict, env: object):  # type: ignore[no-untyped-def, type-arg]
    if request["input"].get("started"):
        await asyncio.to_thread(Path(request["input"]["started"]).touch)
    await asyncio.sleep(float(request["input"].get("sleep", 0)))
    return {"slept": request["input"].get("sleep", 0)}


start({"handler": handler})
