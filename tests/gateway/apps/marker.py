"""Creates the file input.started (so a test knows the handler runs), then sleeps
input.sleep seconds and answers {"slept": input.sleep}."""

import time
from pathlib import Path

from spirit_gpu import start


def handler(request: dict, env: object) -> dict:  # type: ignore[type-arg]
    data = request["input"]
    if data.get("started"):
        Path(data["started"]).touch()
    time.sleep(float(data.get("sleep", 0)))
    return {"slept": data.get("sleep", 0)}


start({"handler": handler})
