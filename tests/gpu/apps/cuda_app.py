"""A handler that holds CUDA memory, for the GPU-isolation test.

``{"input": {"alloc_gib": N}}`` allocates N GiB on the GPU and keeps it;
``"crash": true`` then exits the process mid-job; ``"recycle": true`` asks for
a fresh process after the job. Every answer names the process that ran it.
"""

import os

import torch

from spirit_gpu import start

held: list[torch.Tensor] = []


def handler(request, env):
    job = request["input"]
    gib = float(job.get("alloc_gib", 0))
    if gib:
        held.append(torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda"))
        held[-1].fill_(1)  # touch it: the memory is really in use
        torch.cuda.synchronize()
    if job.get("crash"):
        os._exit(13)
    if job.get("recycle"):
        env.recycle()
    return {"pid": os.getpid(), "held_gib": sum(t.numel() for t in held) / 2**30}


start({"handler": handler})
