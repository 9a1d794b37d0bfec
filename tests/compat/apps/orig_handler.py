"""A handler-mode worker for the ORIGINAL spirit-gpu 0.1.0 (runs in its own venv).

input {"raise": msg}: raises; {"sleep": s}: sleeps first; anything else is echoed
with the request id the worker added under ``meta``.
"""

import time

from spirit_gpu import logger, start
from spirit_gpu.env import Env


def handler(request, env: Env):
    inp = request["input"]
    if isinstance(inp, dict) and inp.get("sleep"):
        logger.info(f"sleeping {inp['sleep']} s", request_id=request["meta"]["requestID"])
        time.sleep(float(inp["sleep"]))
    if isinstance(inp, dict) and inp.get("raise"):
        raise RuntimeError(inp["raise"])
    return {"echo": inp, "requestID": request["meta"]["requestID"]}


start({"handler": handler})
