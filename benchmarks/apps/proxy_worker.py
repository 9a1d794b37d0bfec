"""A proxy-mode worker in its own process: ``serve_proxy`` in front of PROXY_BASE_URL.

Settings are WorkerConfig's usual EASE_*/SPIRIT_* variables; SIGTERM stops it.
"""

import asyncio
import os
import signal
import sys

import aiohttp

from spirit_gpu.config import WorkerConfig
from spirit_gpu.loop import run
from spirit_gpu.supervisor.proxy.worker import serve_proxy


async def main() -> int:
    base_url = os.environ["PROXY_BASE_URL"]
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

    async def check_start() -> tuple[bool, str]:
        try:
            async with aiohttp.ClientSession() as s, s.get(base_url + "/") as r:
                return r.status == 200, ""
        except aiohttp.ClientError as exc:
            return False, repr(exc)

    return await serve_proxy(WorkerConfig.from_sources(), base_url, check_start, stop)


if __name__ == "__main__":
    sys.exit(run(main()))  # type: ignore[arg-type]
