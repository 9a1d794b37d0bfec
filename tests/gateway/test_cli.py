"""spirit-gpu gateway | dev as real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator

import aiohttp
import pytest

from spirit_gpu.gateway.config import GatewayConfig
from tests.conftest import ROOT, free_port
from tests.gateway.conftest import APPS, poll

ENV = dict(os.environ, PYTHONUNBUFFERED="1", SPIRIT_API_KEYS="", SPIRIT_WORKER_TOKEN="")


async def spawn(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "spirit_gpu.cli", *args, cwd=ROOT, env=env or ENV,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def test_config_from_env_and_flags() -> None:
    env = {"SPIRIT_API_KEYS": "a, b,", "SPIRIT_PORT": "9001", "SPIRIT_LEASE_SECONDS": "2.5"}
    cfg = GatewayConfig.from_sources(environ=env, flags={"port": "9002"}, host="0.0.0.0")
    assert (cfg.api_keys, cfg.port, cfg.lease_seconds, cfg.host) == (["a", "b"], 9002, 2.5,
                                                                      "0.0.0.0")
    assert cfg.sync_timeout == 180.0 and cfg.result_retention == 1800.0
    assert cfg.max_body_bytes == 20 * 1024 * 1024


@pytest.mark.parametrize(("args", "needle"), [
    ((), "without an API key"),
    (("--api-key", "k", "--host", "0.0.0.0"), "without a worker token"),
])
async def test_gateway_refuses_unsafe_config(args: tuple[str, ...], needle: str) -> None:
    proc = await spawn("gateway", *args)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2 and needle in out.decode()


async def test_gateway_serves_and_stops_on_sigterm(session: aiohttp.ClientSession) -> None:
    port = free_port()
    proc = await spawn("gateway", "--port", str(port),
                       env=dict(ENV, SPIRIT_API_KEYS="k1,k2"))
    try:
        async def up() -> bool:
            try:
                async with session.post(f"http://127.0.0.1:{port}/v1/s/sync", json={"input": 1},
                                        headers={"Authorization": "Bearer k2"}) as resp:
                    return resp.status == 503
            except aiohttp.ClientConnectionError:
                return False
        await poll(up, 20, "gateway up")
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)
    assert proc.returncode == 0


async def test_dev_runs_gateway_and_worker(session: aiohttp.ClientSession) -> None:
    port = free_port()
    proc = await spawn("dev", str(APPS / "double.py"), "--port", str(port))
    assert proc.stdout is not None
    banner = b""
    while b"Bearer " not in banner:
        banner += await asyncio.wait_for(proc.stdout.readline(), 20)
    key = banner.split(b"Bearer ", 1)[1].split(b"'", 1)[0].decode()
    assert len(key) > 20

    async def answered() -> bool:
        async with session.post(f"http://127.0.0.1:{port}/v1/local/sync",
                                json={"input": {"x": 4}},
                                headers={"Authorization": f"Bearer {key}"}) as resp:
            return resp.status == 200 and await resp.json() == {"doubled": 8}
    await poll(answered, 20, "dev answers")
    async with session.get(f"http://127.0.0.1:{port}/agent/local/apis/v1/request") as resp:
        assert resp.status == 401  # dev generates a worker token
    proc.send_signal(signal.SIGINT)
    await asyncio.wait_for(proc.communicate(), 40)
    assert proc.returncode == 0


async def test_dev_stops_with_the_workers_exit_code() -> None:
    proc = await spawn("dev", str(APPS / "broken.py"), "--port", str(free_port()))
    out, _ = await asyncio.wait_for(proc.communicate(), 40)
    assert proc.returncode not in (0, None), out.decode()
    assert b"the worker exited with code" in out
    proc = await spawn("dev", "no/such/file.py")
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2 and b"no such script" in out
