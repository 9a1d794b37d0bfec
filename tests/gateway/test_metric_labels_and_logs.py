"""What an operator's tools see: /metrics stays bounded however many serverless ids
clients use, and no log line carries an API key or the worker token."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest

from spirit_gpu.gateway.log_redact import REDACTED, redact
from tests.gateway.conftest import KEY, GatewayFactory
from tests.gateway.serving import Served, closed_by_peer

HOOK = "http://127.0.0.1:9/h"


async def test_sid_labels_past_the_limit_fold_into_other(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(metrics_max_sids=3)
    for i in range(10):
        code, _, _ = await gw.call("POST", f"/v1/sid{i}/async",
                                   json_body={"input": i, "webhook": HOOK})
        assert code == 200
    code, text, resp = await gw.call("GET", "/metrics")
    assert code == 200
    page = text.decode()
    sids = set(re.findall(r'sid="([^"]*)"', page))
    assert sids == {"sid0", "sid1", "sid2", "_other"}, sids
    assert 'spirit_gateway_requests_accepted_total{mode="async",sid="_other"} 7.0' in page
    assert 'spirit_gateway_queue_length{sid="_other"} 7.0' in page
    assert 'spirit_gateway_queue_length{sid="sid1"} 1.0' in page


@pytest.mark.parametrize("head", [
    f"Authorization: Bearer {KEY}\x01",  # the bad byte on the key's own line
    f"Auth: sid-{KEY}\x01",
    "Spirit-Worker-Token: wtok\x01",
])
async def test_a_malformed_request_does_not_put_its_key_in_the_logs(
        served: Served, caplog: pytest.LogCaptureFixture, head: str) -> None:
    port = await served(worker_token="wtok")
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /healthz HTTP/1.1\r\nHost: x\r\n{head}\r\n\r\n".encode())
    assert (await closed_by_peer(reader)).startswith(b"HTTP/1.0 400")
    writer.close()
    logged = caplog.text  # as a log handler writes it: message and traceback
    assert "Error handling request" in logged  # aiohttp did log it ...
    assert KEY not in logged and "wtok" not in logged  # ... without the secret
    assert REDACTED in logged


def test_redact_keeps_header_names_and_drops_values() -> None:
    text = ("b'Authorization: Bearer abc123'\n{'auth': 'sid-abc'}\n"
            "X-Api-Key=zzz\nnothing secret here\nthe key k-9 itself")
    out = redact(text, ["k-9"])
    assert "abc123" not in out and "sid-abc" not in out and "zzz" not in out
    assert "k-9" not in out
    assert "Authorization: [redacted]" in out and "nothing secret here" in out
