"""Webhook targets (net/webhook_policy.py) at the gateway's door and on the way out,
webhook failures in the status message, and the link's webhook relay. Nothing here
connects anywhere but 127.0.0.1: refused addresses are checked, never contacted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from spirit_gpu.gateway.webhooks import GatewayWebhooks
from spirit_gpu.net import webhook_policy
from spirit_gpu.net.webhook_policy import (
    PolicyResolver,
    WebhookPolicy,
    WebhookRefused,
    _Answers,
)
from spirit_gpu.supervisor.jobs import metric
from spirit_gpu.supervisor.transports.link import LinkTransport
from tests.conftest import free_port, until
from tests.gateway.conftest import BOTH_STORES, GatewayFactory, Gw, PlainWorker, Webhooks

# ---- the policy on its own ----------------------------------------------------------


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/",
    "http://[fe80::1]:8080/",
    "http://[fd00:ec2::254]/",
    "http://100.100.100.200/",
    "http://[::ffff:169.254.169.254]/",
    "http://0.0.0.0:8080/",
    "http://224.0.0.1/",
])
async def test_link_local_metadata_and_unspecified_addresses_are_refused(url: str) -> None:
    assert "link-local, metadata" in await WebhookPolicy().refusal(url)


async def test_the_gateways_own_listener_and_agent_paths_are_refused() -> None:
    policy = WebhookPolicy.for_gateway("127.0.0.1", 8123)
    assert "own listener" in await policy.refusal("http://127.0.0.1:8123/v1/x/sync")
    assert "own listener" in await policy.refusal("http://localhost:8123/hook")  # resolved
    assert "agent API path" in await policy.refusal(
        "http://127.0.0.1:9999/agent/s/apis/v1/proxy/register")
    assert await policy.refusal("http://127.0.0.1:9999/hook") == ""  # other loopback ports
    assert await policy.refusal("http://10.1.2.3:8123/hook") == ""  # not ours
    # a gateway on every address: each local address with its port is its own
    anywhere = WebhookPolicy.for_gateway("0.0.0.0", 8123)
    assert "own listener" in await anywhere.refusal("http://127.0.0.2:8123/hook")


async def test_a_worker_reaches_its_agent_only_through_the_webhook_relay() -> None:
    policy = WebhookPolicy.for_worker("http://127.0.0.1:8123/agent/s")
    assert await policy.refusal("http://127.0.0.1:8123/agent/s/apis/v1/webhook/r1") == ""
    assert "agent API path" in await policy.refusal(
        "http://127.0.0.1:8123/agent/s/apis/v1/proxy/register")
    assert "own listener" in await policy.refusal("http://127.0.0.1:8123/v1/s/sync")
    assert await policy.refusal("http://127.0.0.1:8124/hook") == ""


async def test_the_allow_list_takes_names_suffixes_and_networks() -> None:
    # names come from /etc/hosts or are allow-listed (not resolved): no DNS query is made
    policy = WebhookPolicy(allow=("hooks.example.com", "*.example.org", "127.0.0.0/8",
                                  "169.254.10.0/24"))
    assert await policy.refusal("http://hooks.example.com/h") == ""
    assert await policy.refusal("https://a.b.example.org/h") == ""
    assert await policy.refusal("http://127.0.0.1:9/h") == ""
    assert await policy.refusal("http://localhost:9/h") == ""  # resolves into 127.0.0.0/8
    assert await policy.refusal("http://169.254.10.5/h") == ""  # listed: the one way in
    assert "allow-list" in await policy.refusal("http://10.0.0.1/h")
    assert "link-local" in await policy.refusal("http://169.254.169.254/h")
    names_only = WebhookPolicy(allow=("hooks.example.com",))
    assert "allow-list" in await names_only.refusal("http://localhost:9/h")
    assert "allow-list" in await names_only.refusal("http://127.0.0.1:9/h")


class CountingLookups:
    """The loop's own getaddrinfo, counting the names asked for."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.asked: list[str] = []
        loop = asyncio.get_running_loop()
        real = loop.getaddrinfo

        async def getaddrinfo(host: str, *args: Any, **kwargs: Any) -> Any:
            self.asked.append(host)
            return await real(host, *args, **kwargs)

        monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)


async def test_a_webhook_host_is_looked_up_once_while_its_answer_is_fresh(
        monkeypatch: pytest.MonkeyPatch) -> None:
    lookups = CountingLookups(monkeypatch)
    answers = _Answers(ttl=0.2)
    many = await asyncio.gather(*(answers.get("localhost", 9) for _ in range(20)))
    assert all(ip.is_loopback for got in many for ip in got) and many[0]
    assert lookups.asked == ["localhost"]  # twenty at once: one lookup
    assert await answers.get("LOCALHOST", 9) == many[0]
    assert lookups.asked == ["localhost"]
    await until(lambda: answers._kept[("localhost", 9)][0] <= asyncio.get_running_loop().time())
    await answers.get("localhost", 9)
    assert lookups.asked == ["localhost", "localhost"]  # stale: asked again


async def test_a_caller_that_gives_up_does_not_end_the_shared_lookup(
        monkeypatch: pytest.MonkeyPatch) -> None:
    lookups = CountingLookups(monkeypatch)
    answers = _Answers(ttl=5.0)
    first = asyncio.create_task(answers.get("localhost", 9))
    second = asyncio.create_task(answers.get("localhost", 9))
    await until(lambda: lookups.asked == ["localhost"])
    first.cancel()
    assert (await second) and lookups.asked == ["localhost"]


async def test_refusals_of_a_named_host_share_one_lookup(
        monkeypatch: pytest.MonkeyPatch) -> None:
    lookups = CountingLookups(monkeypatch)
    policy = WebhookPolicy.for_gateway("127.0.0.1", 8123)
    for _ in range(5):
        assert await policy.refusal("http://localhost:8124/hook") == ""
        assert "own listener" in await policy.refusal("http://localhost:8123/hook")
    assert lookups.asked == ["localhost", "localhost"]  # once per (name, port)


async def test_a_decision_is_kept_as_long_as_the_answers_it_rests_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []
    real_resolve = webhook_policy.resolve

    async def counting(host: str, port: int) -> list[Any]:
        asked.append(host)
        return await real_resolve(host, port)
    monkeypatch.setattr(webhook_policy, "resolve", counting)
    clock = [1000.0]
    monkeypatch.setattr(webhook_policy.time, "monotonic", lambda: clock[0])
    policy = WebhookPolicy.for_gateway("127.0.0.1", 8123)
    for path in ("/a", "/b", "/c?x=1"):
        assert await policy.refusal(f"http://127.0.0.1:8124{path}") == ""
        assert "own listener" in await policy.refusal(f"http://127.0.0.1:8123{path}")
        # the path is checked every time: an agent path is never kept as allowed
        assert "agent API path" in await policy.refusal(
            "http://127.0.0.1:8124/agent/s/apis/v1/proxy/register")
    assert asked.count("127.0.0.1") == 4  # each (host, port): itself and its own listener
    clock[0] += webhook_policy.ANSWER_TTL + 1
    assert await policy.refusal("http://127.0.0.1:8124/a") == ""
    assert asked.count("127.0.0.1") == 6  # stale: decided anew


async def test_a_listener_learned_later_is_refused_at_once() -> None:
    sender = GatewayWebhooks()
    port = free_port()
    try:
        assert await sender.refusal(f"http://127.0.0.1:{port}/hook") == ""
        sender.listener(("127.0.0.1", port))  # a request came in on it
        assert "own listener" in await sender.refusal(f"http://127.0.0.1:{port}/hook")
    finally:
        await sender.close()


async def test_the_connection_resolver_refuses_forbidden_addresses() -> None:
    resolver = PolicyResolver(WebhookPolicy)
    try:
        with pytest.raises(WebhookRefused):
            await resolver.resolve("0.0.0.0", 80)
        assert (await resolver.resolve("127.0.0.1", 80))[0]["host"] == "127.0.0.1"
    finally:
        await resolver.close()


async def test_the_gateway_refuses_to_send_to_a_forbidden_target() -> None:
    sender = GatewayWebhooks()
    try:
        status, why = await sender.deliver(f"http://0.0.0.0:{free_port()}/h", "r", 499, b"{}")
        assert status == 0
        assert why.startswith("webhook delivery failed after 1 try: webhook refused")
    finally:
        await sender.close()


# ---- at the door ----------------------------------------------------------------------


async def test_the_public_api_refuses_forbidden_webhooks_with_400(
        gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory()
    own = f"{gw.url}/agent/rogue/apis/v1/proxy/register"
    for mode, hook, why in [
        ("async", own, "agent API path"),
        ("async", f"{gw.url}/v1/x/status", "own listener"),
        ("async", "http://169.254.169.254/latest/", "link-local"),
        ("sync", "http://[fe80::1]/h", "link-local"),
    ]:
        code, body, _ = await gw.call("POST", f"/v1/s/{mode}",
                                      json_body={"input": {}, "webhook": hook})
        assert code == 400, (hook, body)
        assert why in body["error"], body
    code, body, _ = await gw.call("POST", "/v1/s/async", json_body={
        "input": {}, "webhook": f"http://127.0.0.1:{free_port()}/hook"})
    assert code == 200, body


async def test_the_gateways_allow_list_applies_at_the_door(
        gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(webhook_allow=["hooks.example.com"])
    code, body, _ = await gw.call("POST", "/v1/s/async", json_body={
        "input": {}, "webhook": "http://127.0.0.1:9/hook"})
    assert code == 400 and "allow-list" in body["error"]


# ---- webhook failures in the status ---------------------------------------------------


@BOTH_STORES
async def test_a_workers_final_webhook_failure_reaches_the_status(gw: Gw) -> None:
    worker = PlainWorker(gw, "wf")
    code, body, _ = await gw.call("POST", "/v1/wf/async", json_body={
        "input": {}, "webhook": "http://127.0.0.1:9/hook"})
    rid = body["id"]
    _, env = await until(lambda: worker.pull(wait_ms=500), 10, "the job")
    assert env is not None
    await worker.executing(rid)
    await worker.result(rid, 200, b'{"ok": true}')
    failure = "webhook delivery failed after 5 tries: webhook unreachable: refused"
    await worker.post(f"request-metric/{rid}", {"status": "succeed", "message": failure})
    st = await gw.status("wf", rid)
    assert (st["status"], st["statusCode"]) == ("succeed", 200)  # the end itself stays
    assert failure in st["message"]


@BOTH_STORES
async def test_the_gateways_own_webhook_failure_reaches_the_status(gw: Gw,
                                                                     dead_port: int) -> None:
    dead = f"http://127.0.0.1:{dead_port}/hook"  # nothing listens there
    code, body, _ = await gw.call("POST", "/v1/gf/async", json_body={
        "input": {}, "webhook": dead})
    rid = body["id"]
    code, _, _ = await gw.call("DELETE", "/v1/gf/async", params={"requestID": rid})
    assert code == 200

    async def noted() -> str:
        message = str((await gw.status("gf", rid))["message"])
        return message if "webhook delivery failed after 3 tries" in message else ""
    message = await until(noted, 15, "the webhook failure in the status")
    st = await gw.status("gf", rid)
    assert (st["status"], st["statusCode"]) == ("cancelled", 499)
    assert "webhook unreachable" in message


async def test_a_gateway_ended_request_keeps_its_message_against_a_worker(gw: Gw) -> None:
    worker = PlainWorker(gw, "ge")
    code, body, _ = await gw.call("POST", "/v1/ge/async", json_body={
        "input": {}, "webhook": "http://127.0.0.1:9/hook"})
    rid = body["id"]
    _, env = await until(lambda: worker.pull(wait_ms=500), 10, "the job")
    await gw.call("DELETE", "/v1/ge/async", params={"requestID": rid})
    await worker.post(f"request-metric/{rid}", {"status": "succeed", "message": "all fine"})
    st = await gw.status("ge", rid)
    assert st["status"] == "cancelled" and "all fine" not in st["message"]


# ---- the link's webhook relay ----------------------------------------------------------


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def test_a_link_worker_ignoring_a_cancel_cannot_deliver_200_after_the_499(
        gw: Gw, webhooks: Webhooks, session: aiohttp.ClientSession) -> None:
    link = LinkTransport(session, f"{gw.url}/agent/lr")
    await link.connect()
    code, body, _ = await gw.call("POST", "/v1/lr/async",
                                  json_body={"input": {}, "webhook": webhooks.url})
    rid = body["id"]
    jobs = []
    while not jobs:
        jobs = (await link.pull(1)).jobs
    (job,) = jobs
    job.started_at = job.received_at
    await link.metric(job, metric(job, "executing"))
    code, _, _ = await gw.call("DELETE", "/v1/lr/async", params={"requestID": rid})
    assert code == 200
    (query, _), = await webhooks.wait(1)  # the gateway's own 499
    assert query["statusCode"] == "499"
    # the worker ignores the cancel: it finishes, reports 200 and calls its webhook
    await link.result(job, 200, "", b'{"late": true}')
    async with session.post(job.webhook, data=b'{"late": true}',
                            params={"requestID": rid, "statusCode": "200"}) as resp:
        assert resp.status == 200  # answered, and dropped: the gateway ended it first
    await asyncio.sleep(0)  # a forwarded call would have been sent before the answer
    assert [q["statusCode"] for q, _ in webhooks.received] == ["499"]
    st = await gw.status("lr", rid)
    assert (st["status"], st["statusCode"]) == ("cancelled", 499)
    await link.close()
