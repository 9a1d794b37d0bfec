"""The smallest worker: doubles input.x. Run it with `spirit-gpu dev examples/hello/main.py`."""

from spirit_gpu import Env, logger, start


def handler(request: dict, env: Env) -> dict:
    logger.info("doubling", request_id=env.request_id)
    x = request["input"].get("x", 0)
    return {"y": x * 2}


start({"handler": handler, "concurrency_modifier": lambda current: 2})
