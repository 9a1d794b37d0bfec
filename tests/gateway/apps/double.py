"""Doubles input.x; with input.sleep it sleeps first; input.exit makes the child os._exit."""

import os
import time

from spirit_gpu import start


def handler(request: dict, env: object):  # type: ignore[no-untyped-def, type-arg]
    data = request["input"]
    if data.get("exit"):
        os._exit(int(data["exit"]))
    if data.get("sleep"):
        time.sleep(float(data["sleep"]))
    if data.get("bytes"):
        return b"\x00raw bytes"
    return {"doubled": data.get("x", 0) * 2}


start({"handler": handler,
       "concurrency_modifier": lambda current: int(os.environ.get("APP_CONCURRENCY", "4"))})
