"""The one rule for results (spirit_gpu/handlers.py): returned bytes go out raw,
everything else is JSON with bytes as base64 strings, generator items included;
the gateway and test mode serve them with the same content type."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

from spirit_gpu.env import Env
from spirit_gpu.handlers import ASYNC_GENERATOR, GENERATOR, SYNC, run_async, run_sync
from spirit_gpu.protocol.agent import result_content_type
from tests.conftest import free_port

B64 = base64.b64encode(b"raw-0").decode()


def gen(request: dict[str, Any], env: Env) -> Iterator[Any]:
    yield b"raw-0"
    yield {"n": 1}


async def agen(request: dict[str, Any], env: Env) -> AsyncIterator[Any]:
    yield b"raw-0"
    yield {"n": 1}


def test_generators_yielding_bytes_give_json_with_base64_items() -> None:
    chunks: list[bytes] = []
    out = run_sync(gen, GENERATOR, {"input": {}}, Env(), lambda i, b: chunks.append(b))
    assert json.loads(out.body) == [B64, {"n": 1}]
    assert [json.loads(c) for c in chunks] == [B64, {"n": 1}]
    achunks: list[bytes] = []
    aout = asyncio.run(run_async(agen, ASYNC_GENERATOR, {"input": {}}, Env(),
                                 lambda i, b: achunks.append(b)))
    assert (aout.body, achunks) == (out.body, chunks)
    assert result_content_type(out.body) == "application/json"


def test_returned_bytes_stay_raw_and_bytes_inside_json_are_base64() -> None:
    raw = run_sync(lambda r, e: b"\x00raw", SYNC, {"input": {}}, Env(), None)
    assert raw.body == b"\x00raw" and result_content_type(raw.body) == "application/octet-stream"
    nested = run_sync(lambda r, e: {"b": b"\x01"}, SYNC, {"input": {}}, Env(), None)
    assert json.loads(nested.body) == {"b": base64.b64encode(b"\x01").decode()}


def _post(port: int, kind: str) -> tuple[int, str, bytes]:
    body = json.dumps({"input": {"kind": kind}}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/", data=body)
    with urllib.request.urlopen(request, timeout=30) as resp:
        return resp.status, resp.headers.get_content_type(), resp.read()


def test_test_mode_serves_results_as_the_gateway_does(worker_factory: Any) -> None:
    port = free_port()
    worker = worker_factory("results.py", {"EASE_TEST_MODE": "true",
                                           "EASE_TEST_PORT": str(port)})
    deadline = time.monotonic() + 30
    while True:
        try:
            first = _post(port, "bytes")
            break
        except (urllib.error.URLError, ConnectionError):
            assert worker.proc.poll() is None and time.monotonic() < deadline, worker.output
            time.sleep(0.05)
    assert first == (200, "application/octet-stream", b"\x00raw")
    assert _post(port, "dict")[1:] == ("application/json", b'{"b":"AQ=="}')
    # bytes that happen to be JSON are served as JSON, by the gateway too
    assert _post(port, "json_bytes")[1] == "application/json"
    code, ctype, body = _post(port, "list")
    assert (code, ctype, json.loads(body)) == (200, "application/json", [B64, {"n": 1}])
