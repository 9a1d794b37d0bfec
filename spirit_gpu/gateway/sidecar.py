"""``spirit-gpu agent``: the agent sidecar beside one worker, relaying to a gateway.

On the hosted platform every worker has an agent next to it at
``http://localhost:8087`` that serves ``/apis/v1/...`` at the root, with no
serverless id in the path. The original spirit-gpu worker depends on that:
it builds agent URLs with ``urljoin(url, "/apis/v1/...")``, which drops any
path prefix (DESIGN.md 5a). This sidecar plays that agent for a worker of
our gateway: every ``/apis/v1/<rest>`` call is passed on to
``<gateway>/agent/<sid>/apis/v1/<rest>``, bodies streamed both ways (so a
``request-proxy`` answer reaches the waiting client as it is written).

What it adds on the way:

* ``Authorization: Bearer <worker token>`` (the original worker sends none); a
  sidecar given no token passes on the worker's own, if any;
* ``Spirit-Agent-Base``: the sidecar's own ``/apis/v1`` as the worker reaches it, so
  the gateway's webhook relay URL in a job points here too (our worker refuses an
  agent path other than its own agent's relay);
* ``Spirit-Worker-Id: shared:sidecar-<host>-<pid>-<random>`` when the worker
  sends no id of its own. The ``shared:`` prefix asks the gateway for leases
  per request (renewed by heartbeats that name the request), so even two
  workers behind one sidecar keep apart: a dead worker's job fails or is
  redelivered while its neighbour keeps polling.

What it takes away: the ``link`` and ``proxy`` extensions from
``Spirit-Agent-Features`` (a WebSocket is not relayed here, and a proxy
listener behind the sidecar is not reachable from the gateway); a worker of
ours behind the sidecar speaks the plain protocol, as with the hosted agent.
Long-poll, stream chunks and cancel notices pass through.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web
from yarl import URL

from spirit_gpu.net.outage import Outage
from spirit_gpu.net.relay import HOP_BY_HOP, filter_pairs, json_error, new_session
from spirit_gpu.protocol import agent
from spirit_gpu.protocol.agent import (
    AGENT_BASE_HEADER,
    FEATURES_HEADER,
    WORKER_ID_HEADER,
    parse_features,
)

SHARED_PREFIX = "shared:"  # the gateway's mark for "leases per request" (storage.base)
NOT_RELAYED = frozenset({"link", "proxy"})
SMALL_BODY = 1024 * 1024  # read whole and sent with a length; larger ones are streamed
_DROP_REQUEST_KEEP_AUTH = HOP_BY_HOP | {"content-length", AGENT_BASE_HEADER.lower()}
_DROP_REQUEST = _DROP_REQUEST_KEEP_AUTH | {"authorization"}
_DROP_ANSWER = HOP_BY_HOP | {"content-length", "content-encoding"}


def sidecar_identity() -> str:
    return f"{SHARED_PREFIX}sidecar-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


class Sidecar:
    """Relays the plain agent API at the root to one serverless id of a gateway."""

    def __init__(self, gateway_url: str, sid: str, worker_token: str = "",
                 identity: str = "") -> None:
        self.upstream = agent.join_url(gateway_url, f"/agent/{sid}")
        self.worker_token = worker_token
        self.identity = identity or sidecar_identity()
        self.session: aiohttp.ClientSession | None = None
        # every relayed call fails while the gateway is away: logged once each way
        self.outage = Outage(f"agent sidecar: gateway at {self.upstream}")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", agent.API_PREFIX + "/{tail:.*}", self.relay)
        app.cleanup_ctx.append(self._lifetime)
        return app

    async def _lifetime(self, _: web.Application) -> AsyncIterator[None]:
        self.session = new_session()
        yield
        await self.session.close()

    async def relay(self, request: web.Request) -> web.StreamResponse:
        assert self.session is not None, "sidecar used before its app started"
        tail = request.match_info["tail"]
        if tail.split("/", 1)[0] in NOT_RELAYED:
            # as the hosted agent: no registration, no link (the worker falls back to plain)
            return json_error(404, f"the agent sidecar does not offer {tail}")
        target = URL(self.upstream + request.raw_path, encoded=True)
        # its own token replaces the worker's; without one, the worker's passes on
        headers = filter_pairs(request.headers.items(),
                               _DROP_REQUEST if self.worker_token else _DROP_REQUEST_KEEP_AUTH)
        if WORKER_ID_HEADER not in request.headers:
            headers.append((WORKER_ID_HEADER, self.identity))
        # the webhook relay URL the gateway hands out then comes through here too: a
        # worker of ours calls only its own agent's relay path
        headers.append((AGENT_BASE_HEADER, f"{request.url.origin()}{agent.API_PREFIX}"))
        if self.worker_token:
            headers.append(("Authorization", f"Bearer {self.worker_token}"))
        body: object = None
        if request.body_exists:
            small = request.content_length is not None and request.content_length <= SMALL_BODY
            body = await request.read() if small else request.content
        try:
            upstream = await self.session.request(request.method, target, headers=headers,
                                                  data=body, allow_redirects=False)
        except (aiohttp.ClientError, OSError) as exc:
            self.outage.down(repr(exc))
            return json_error(502, f"agent sidecar: gateway unreachable: {exc!r}")
        self.outage.up()
        try:
            resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in filter_pairs(upstream.headers.items(), _DROP_ANSWER):
                if key.lower() == FEATURES_HEADER.lower():
                    value = ",".join(sorted(parse_features(value) - NOT_RELAYED))
                resp.headers.add(key, value)
            if upstream.content_length is not None:
                resp.content_length = upstream.content_length
            await resp.prepare(request)
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp
        finally:
            upstream.release()


async def serve_sidecar(sidecar: Sidecar, host: str, port: int, stop: asyncio.Event,
                        on_ready: Callable[[int], None] | None = None) -> None:
    """Run until ``stop`` is set; ``on_ready`` gets the bound port."""
    # a worker that hangs up mid long-poll cancels the relayed poll, so the gateway sees
    # the sidecar's connection go too and gives a job it was about to hand out back
    runner = web.AppRunner(sidecar.app(), access_log=None, shutdown_timeout=5.0,
                           handler_cancellation=True)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
        if on_ready is not None:
            on_ready(int(runner.addresses[0][1]))
        await stop.wait()
    finally:
        await runner.cleanup()
