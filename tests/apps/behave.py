"""A sync handler whose input says what to do: the supervisor tests' workhorse."""

import os
import signal
import time

from spirit_gpu import HandlerError, logger, start

CONCURRENCY = int(os.environ.get("APP_CONCURRENCY", "1"))


def handler(request, env):
    spec = request["input"]
    logger.info("working", request_id=env.request_id)
    start_t = time.time()
    if "sleep" in spec:
        time.sleep(spec["sleep"])
    if "exit" in spec:
        os._exit(spec["exit"])
    if spec.get("kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    if spec.get("wedge"):
        os.kill(os.getpid(), signal.SIGSTOP)
    if "raise" in spec:
        raise RuntimeError(spec["raise"])
    if "status" in spec:
        raise HandlerError(spec["status"], "chosen status", details={"field": "x"})
    if spec.get("recycle"):
        env.recycle()
    if spec.get("bytes"):
        return b"\x00raw-bytes"
    return {"y": spec.get("x", 0) * 2, "pid": os.getpid(), "start": start_t,
            "end": time.time(), "meta": request["meta"]}


def _vanish(signum, frame):
    """SIGUSR1: close the pipe to the supervisor, then take a while to exit.

    Like a process whose teardown (freeing GPU memory) outlasts its pipe.
    """
    from spirit_gpu.child import channel

    os.close(channel.CHANNEL.read_fd)
    os.close(channel.CHANNEL._wfd)
    open(os.environ["APP_VANISHED_FILE"], "w").close()
    time.sleep(1.5)
    os._exit(9)


if os.environ.get("APP_VANISHED_FILE"):
    signal.signal(signal.SIGUSR1, _vanish)


def concurrency(current):
    if os.environ.get("APP_BAD_MODIFIER"):
        raise ValueError("boom")
    return CONCURRENCY


start({"handler": handler, "concurrency_modifier": concurrency})
