"""Each request leaves an orphan behind: a grandchild that outlives its parent."""

import subprocess

from spirit_gpu import start


def handler(request, env):
    # sh exits at once; its background sleep is re-parented to PID 1 and exits later
    subprocess.run(["sh", "-c", "sleep 0.2 & exit 0"], check=True)
    return {"ok": True}


start({"handler": handler})
