"""A real worker behind the gateway: a webhook's final failure ends up in the status
message a client reads, on both transports (both go through the gateway's relay)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import until
from tests.gateway.conftest import TOKEN, GatewayFactory, Gw
from tests.gateway.test_e2e import TRANSPORTS, start_worker


@pytest.fixture
async def tgw(gateway_factory: GatewayFactory) -> Gw:
    return await gateway_factory(worker_token=TOKEN, lease_seconds=1.0)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_dead_webhook_is_named_in_the_status(tgw: Gw, worker_factory: Any,
                                                     transport: str, dead_port: int) -> None:
    await start_worker(tgw, worker_factory, "d", "double.py", transport,
                       SPIRIT_WEBHOOK_ATTEMPTS="1")
    dead = f"http://127.0.0.1:{dead_port}/hook"  # nothing listens there
    code, acc, _ = await tgw.call("POST", "/v1/d/async",
                                  json_body={"input": {"x": 5}, "webhook": dead})
    assert code == 200

    async def noted() -> dict[str, Any] | None:
        st = await tgw.status("d", acc["id"])
        return st if "webhook delivery failed" in st["message"] else None
    st = await until(noted, 20, "the webhook failure in the status")
    assert (st["status"], st["statusCode"]) == ("succeed", 200)
    assert "webhook unreachable" in st["message"], st
