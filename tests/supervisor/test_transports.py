"""The plain transport against an agent that is down: typed errors, one log line per outage."""

from __future__ import annotations

import aiohttp
import pytest

from spirit_gpu.supervisor.transports.base import AgentUnavailable
from spirit_gpu.supervisor.transports.plain import PlainTransport
from tests.conftest import free_port


async def test_heartbeats_to_a_dead_agent_log_the_outage_once(
        capfd: pytest.CaptureFixture[str]) -> None:
    async with aiohttp.ClientSession() as session:
        plain = PlainTransport(session, f"http://127.0.0.1:{free_port()}")
        assert not plain.capabilities.batched_pulls
        for _ in range(4):
            with pytest.raises(AgentUnavailable):
                await plain.heartbeat([])
        with pytest.raises(AgentUnavailable):
            await plain.pull(1)
    out = capfd.readouterr().out
    assert out.count("unreachable") == 1
    assert "giving up" not in out
