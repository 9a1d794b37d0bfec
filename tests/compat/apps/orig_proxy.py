"""A proxy-mode worker for the ORIGINAL spirit-gpu 0.1.0: fronts ``LLM_URL``."""

import os
import urllib.request

from spirit_gpu import start

base_url = os.environ["LLM_URL"]


def check_start():
    with urllib.request.urlopen(base_url + "/", timeout=2) as response:
        return response.status == 200


start({"mode": "proxy", "base_url": base_url, "check_start": check_start})
