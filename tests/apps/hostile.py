"""A sync handler that misbehaves on request: breaks the pipe protocol, forks, fails
like a GPU out of memory. The supervisor hardening tests' workhorse."""

import os
import struct
import time

from spirit_gpu import start


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError (no torch needed)."""


def _raw(data: bytes) -> None:
    from spirit_gpu.child import channel

    channel.CHANNEL.write(data)


def handler(request, env):
    spec = request["input"]
    if spec.get("frame") == "huge":
        # a 4 GB length prefix, then a body that keeps coming
        _raw(struct.pack(">I", 0xFFFFFFFF))
        for _ in range(32):
            _raw(b"\x00" * (1 << 20))
        time.sleep(60)
    if spec.get("frame") == "garbage":
        _raw(struct.pack(">I", 5) + b"\xc1" * 5)  # 0xc1 is never valid MessagePack
        time.sleep(60)
    if "result_mb" in spec:
        return {"blob": "x" * int(spec["result_mb"] * (1 << 20))}
    if "fork" in spec:
        pid = os.fork()
        if pid == 0:  # the grandchild: sleeps long, in its parent's process group
            time.sleep(120)
            os._exit(0)
        with open(spec["fork"], "w") as f:
            f.write(str(pid))
        time.sleep(spec.get("sleep", 0))
        return {"grandchild": pid}
    if spec.get("oom"):
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    if spec.get("exit"):
        os._exit(spec["exit"])
    return {"pid": os.getpid(), "token": os.environ.get("SPIRIT_WORKER_TOKEN"),
            "secret_names": sorted(k for k in os.environ if "TOKEN" in k)}


start({"handler": handler})
