"""tests/proxy/fake_llm.py's FakeLLM as a standalone server: python fake_llm_server.py PORT."""

import sys

import uvloop
from aiohttp import web

from tests.proxy.fake_llm import FakeLLM

fake = FakeLLM(url=f"http://127.0.0.1:{sys.argv[1]}")
web.run_app(fake.app(), host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
            loop=uvloop.new_event_loop())
