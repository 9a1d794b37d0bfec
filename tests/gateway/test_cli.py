"""spirit-gpu gateway | dev as real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from spirit_gpu import cli
from spirit_gpu.gateway.config import GatewayConfig
from tests.conftest import ROOT, free_port, until
from tests.gateway.conftest import APPS

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


@pytest.mark.parametrize(("args", "needle"), [
    (("gateway", "--api-key", "k", "--webhook-allow", "10.0.0.0/33"),
     "--webhook-allow: ['10.0.0.0/33'] has '10.0.0.0/33', which is not a host name"),
    (("agent", "--gateway", "127.0.0.1:8000", "--serverless-id", "s"),
     "'127.0.0.1:8000' is not an http(s) URL with a host"),
])
async def test_a_value_that_cannot_be_used_stops_the_command_with_one_line(
        args: tuple[str, ...], needle: str) -> None:
    proc = await spawn(*args)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2 and needle in out.decode(), out
    assert "Traceback" not in out.decode()


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
        await until(up, 20, "gateway up")
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
    await until(answered, 20, "dev answers")
    async with session.get(f"http://127.0.0.1:{port}/agent/local/apis/v1/request") as resp:
        assert resp.status == 401  # dev generates a worker token
    proc.send_signal(signal.SIGINT)
    await asyncio.wait_for(proc.communicate(), 40)
    assert proc.returncode == 0


async def test_dev_stops_with_the_workers_exit_code(
        capsys: pytest.CaptureFixture[str]) -> None:
    proc = await spawn("dev", str(APPS / "broken.py"), "--port", str(free_port()))
    out, _ = await asyncio.wait_for(proc.communicate(), 40)
    assert proc.returncode not in (0, None), out.decode()
    assert b"the worker exited with code" in out
    proc = await spawn("dev", "no/such/file.py")
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2 and b"no such script" in out
    script = str(APPS / "marker.py")  # a worker flag before the script: its value taken for it
    assert cli.main(["dev", "--job-timeout", "30", script]) == 2
    assert f"no such script: 30 (worker flags go after the script: spirit-gpu dev {script} " \
        "--flag value)" in capsys.readouterr().err


def test_dev_banner_is_plain_and_uses_test_input(tmp_path: Path) -> None:
    from spirit_gpu.cli import banner

    script = tmp_path / "main.py"
    script.write_text("start({'handler': handler})\n")
    text = banner("http://127.0.0.1:1", "local", "KEY", str(script))
    assert not any(ch in text for ch in "│╭╰─")  # no box: a copied line pastes as it is
    lines = text.splitlines()
    curl = lines[lines.index(next(x for x in lines if x.startswith("curl"))):]
    assert all(x.endswith(" \\") for x in curl[:3]) and curl[3] == \
        """  -d '{"input": {"x": 21}}'"""
    (tmp_path / "test_input.json").write_text('{"input": {"prompt": "it\'s"}}')
    text = banner("http://127.0.0.1:1", "local", "KEY", str(script))
    assert """-d '{"input": {"prompt": "it'"'"'s"}}'""" in text
    (tmp_path / "test_input.json").write_text('{"prompt": "bare"}')  # no "input" key: wrapped
    assert """-d '{"input": {"prompt": "bare"}}'""" in banner("u", "s", "k", str(script))

    script.write_text('start({"mode": "proxy", "base_url": "http://127.0.0.1:11434"})\n')
    text = banner("http://127.0.0.1:1", "local", "KEY", str(script))
    assert "curl -s http://127.0.0.1:1/v1/models -H 'Auth: local-KEY'" in text
    assert "/sync" not in text


async def _dev_key(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    banner = b""
    while b"Bearer " not in banner:
        banner += await asyncio.wait_for(proc.stdout.readline(), 20)
    return banner.split(b"Bearer ", 1)[1].split(b"'", 1)[0].decode()


async def test_dev_passes_worker_flags_and_ctrl_c_lets_running_jobs_finish(
        session: aiohttp.ClientSession, tmp_path: Path) -> None:
    port = free_port()
    # --job-timeout is the worker's flag; as a terminal does, Ctrl-C goes to the whole group
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "spirit_gpu.cli", "dev", str(APPS / "marker.py"), "--port",
        str(port), "--job-timeout", "4", cwd=ROOT, env=ENV, start_new_session=True,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        key = await _dev_key(proc)
        url = f"http://127.0.0.1:{port}/v1/local/sync"
        headers = {"Authorization": f"Bearer {key}"}

        async def answered() -> bool:
            async with session.post(url, json={"input": {}}, headers=headers) as resp:
                return resp.status == 200
        await until(answered, 30, "dev answers")
        async with session.post(url, json={"input": {"sleep": 60}}, headers=headers) as resp:
            assert "4 s job timeout" in await resp.text()  # the worker got --job-timeout
        started = tmp_path / "started"
        slow = asyncio.create_task(session.post(
            url, json={"input": {"sleep": 2, "started": str(started)}}, headers=headers))

        async def running() -> bool:
            return started.exists()
        await until(running, 30, "the handler runs")
        os.killpg(proc.pid, signal.SIGINT)
        async with await slow as resp:  # it finishes within the grace period the banner says
            assert (resp.status, await resp.json()) == (200, {"slept": 2})
        out, _ = await asyncio.wait_for(proc.communicate(), 40)
        assert proc.returncode == 0, out.decode()
        assert b"stopping now" not in out and b"within the 0 s grace period" not in out
    finally:
        if proc.returncode is None:  # the worker runs in a session of its own: end it too
            children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,  # noqa: ASYNC221
                                      text=True).stdout.split()
            for pid in children:
                os.kill(int(pid), signal.SIGKILL)
            proc.kill()
            await proc.wait()
