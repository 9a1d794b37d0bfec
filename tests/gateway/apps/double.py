"""Doubles input.x; with input.sleep it sleeps first; input.exit makes the child os._exit;
input.blob=N answers N bytes of x."""

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
    if data.get("blob"):  # a large raw result: fills the link's socket buffers
        return bytes([data.get("x", 0) % 256]) * int(data["blob"])
    return {"doubled": data.get("x", 0) * 2}


start({"handler": handler,
       "concurrency_modifier": lambda current: int(os.environ.get("APP_CONCURRENCY", "4"))})
