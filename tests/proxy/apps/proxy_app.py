"""A proxy-mode worker script, as a user writes it (README example shape).

``LLM_URL``: the LLM server. ``READY_FLAG``: a file that must exist before
check_start says True (until then it raises, like a server still loading).
``ASYNC_CHECK=1`` uses a coroutine check_start instead of a plain function.
"""

import os
import urllib.request

import aiohttp

from spirit_gpu import logger, start

base_url = os.environ["LLM_URL"]
flag = os.environ.get("READY_FLAG", "")


def loading() -> bool:
    return bool(flag) and not os.path.exists(flag)


def check_start() -> bool:
    if loading():
        raise RuntimeError("model still loading")
    with urllib.request.urlopen(base_url + "/", timeout=2) as response:
        return bool(response.status == 200)


async def check_start_async() -> bool:
    if loading():
        return False
    try:
        async with aiohttp.ClientSession() as session, session.get(base_url) as response:
            logger.info(f"response.status: {response.status}, text: {await response.text()}")
            return True
    except aiohttp.ClientError:
        return False


start({
    "mode": "proxy",
    "base_url": base_url,
    "check_start": check_start_async if os.environ.get("ASYNC_CHECK") == "1" else check_start,
})
