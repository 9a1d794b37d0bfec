"""The original spirit-gpu 0.1.0 worker in proxy mode behind our proxy route: it does not
register, so proxied requests ride the queue as proxy jobs (DESIGN.md 5a)."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from spirit_gpu.gateway.service import GATEWAY_KEY
from tests.compat.conftest import Procs
from tests.conftest import until
from tests.gateway.conftest import GatewayFactory, Gw
from tests.proxy.fake_llm import FakeLLM

KEY = "pk"


async def _setup(gateway_factory: GatewayFactory, procs: Procs, python: Path,
                 llm: FakeLLM, sid: str) -> Gw:
    gw = await gateway_factory(api_keys=[KEY])
    agent_url = await procs.sidecar(gw, sid)
    procs.original(python, "orig_proxy.py", agent_url, LLM_URL=llm.url)

    async def present() -> bool:
        return await gw.app[GATEWAY_KEY].storage.worker_count(sid) > 0
    await until(present, 30, "the original proxy worker polling")
    return gw


async def test_streamed_and_whole_answers(gateway_factory: GatewayFactory, procs: Procs,
                                          original_python: Path, llm: FakeLLM) -> None:
    sid = "origllm"
    gw = await _setup(gateway_factory, procs, original_python, llm, sid)
    auth = {"Auth": f"{sid}-{KEY}"}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{gw.url}/v1/chat/completions", headers=auth,
                          json={"stream": False}) as r:
            assert r.status == 200, await r.text()
            body = await r.json()
            # the upstream's headers only: none of the worker's or the sidecar's to the agent
            leaked = {"Spirit-Agent-Base", "Spirit-Worker-Id", "Authorization"} & set(r.headers)
            assert not leaked, r.headers
        assert body["choices"][0]["message"]["content"] == "hello"
        assert "Auth" not in llm.seen[-1]["headers"]

        gate = llm.gate("last")
        async with s.post(f"{gw.url}/api/generate", headers={**auth, "X-Gate": "last"},
                          json={"chunks": 3, "delay": 0.0}) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("application/x-ndjson")
            first = await r.content.readline()
            assert json.loads(first)["response"] == "w0 "
            assert not gate.is_set()  # the first line came before the last was written
            gate.set()
            rest = (await r.read()).splitlines()
        assert json.loads(rest[-1])["done"] is True and len(rest) == 3

        async with s.get(f"{gw.url}/v1/no-such-thing", headers=auth) as r:
            assert r.status == 404  # the upstream's status: the original's later 500 is dropped
    storage = gw.app[GATEWAY_KEY].storage
    statuses = sorted(rec.rec.status_code for rec in storage._entries.values())  # type: ignore[attr-defined]
    assert statuses == [200, 200, 404], statuses
