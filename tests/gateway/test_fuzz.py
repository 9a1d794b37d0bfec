"""Fuzz the public API from its own /openapi.json: no input makes the gateway answer 5xx."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from spirit_gpu.gateway.app import create_app
from spirit_gpu.gateway.config import GatewayConfig
from tests.conftest import free_port

KEY = "fuzz-key"
SID = "echo"
EXAMPLES = 20


async def _echo_worker(base: str) -> None:
    async with aiohttp.ClientSession() as s:
        while True:
            async with s.get(f"{base}/request", params={"wait": "1000"}) as resp:
                if resp.status != 200:
                    continue
                env = await resp.json()
            rid = env["headers"]["Ease-Request-Id"]
            data = base64.b64encode(json.dumps({"len": len(env["body"])}).encode()).decode()
            await s.post(f"{base}/request-result/{rid}",
                         json={"statusCode": 200, "message": "", "data": data})


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    """A gateway and an echo worker on their own loop in a thread (the fuzzer is sync)."""
    port = free_port()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop: asyncio.Event | None = None

    async def main() -> None:
        nonlocal stop
        stop = asyncio.Event()
        runner = web.AppRunner(create_app(GatewayConfig(api_keys=[KEY])), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        worker = asyncio.create_task(_echo_worker(f"http://127.0.0.1:{port}/agent/{SID}/apis/v1"))
        ready.set()
        await stop.wait()
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
        await runner.cleanup()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    yield f"http://127.0.0.1:{port}"
    assert stop is not None
    loop.call_soon_threadsafe(stop.set)
    thread.join(10)


def test_fuzz_public_api(base_url: str) -> None:
    document = requests.get(f"{base_url}/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(document)
    operations = [r.ok() for r in schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) >= 9
    failures: list[str] = []
    for op in operations:
        params = {"sid": SID} if "{sid}" in op.path else None
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            strategy = op.as_strategy(generation_mode=mode, path_parameters=params)

            @given(case=strategy)
            @settings(max_examples=EXAMPLES, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            def run(case: schemathesis.Case[Any]) -> None:
                for headers in ({"Authorization": f"Bearer {KEY}"}, {}):
                    resp = case.call(base_url=base_url, headers=headers, timeout=30)
                    if resp.status_code >= 500:
                        failures.append(f"{case.operation.label}: {resp.status_code} "
                                        f"{resp.text[:200]} for {case.body!r} {case.query!r}")
            try:
                run()
            except Unsatisfiable:  # nothing to make invalid (e.g. GET /healthz)
                assert mode is schemathesis.GenerationMode.NEGATIVE, op.label
    assert not failures, "\n".join(failures[:10])
