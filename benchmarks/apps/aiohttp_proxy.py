"""A plain single-hop aiohttp reverse proxy (ClientSession forwarding, streamed).

python aiohttp_proxy.py PORT UPSTREAM_URL
"""

import sys

import aiohttp
import uvloop
from aiohttp import web

UPSTREAM = sys.argv[2].rstrip("/")
SKIP = {"host", "content-length", "transfer-encoding", "connection"}


async def on_startup(app: web.Application) -> None:
    app["session"] = aiohttp.ClientSession(auto_decompress=False)


async def on_cleanup(app: web.Application) -> None:
    await app["session"].close()


async def forward(request: web.Request) -> web.StreamResponse:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in SKIP}
    body = await request.read()
    async with request.app["session"].request(request.method, UPSTREAM + request.rel_url.path_qs,
                                              headers=headers, data=body) as up:
        resp = web.StreamResponse(status=up.status, headers={
            k: v for k, v in up.headers.items() if k.lower() not in SKIP})
        await resp.prepare(request)
        async for chunk in up.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp


app = web.Application(client_max_size=64 * 1024 * 1024)
app.on_startup.append(on_startup)
app.on_cleanup.append(on_cleanup)
app.router.add_route("*", "/{tail:.*}", forward)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
            loop=uvloop.new_event_loop())
