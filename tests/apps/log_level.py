"""start() sets log_level DEBUG; the handler logs one DEBUG line."""

from spirit_gpu import logger, start


def handler(request, env):
    logger.debug("a debug line from the handler", request_id=env.request_id)
    return {"ok": True}


start({"handler": handler, "log_level": "DEBUG"})
