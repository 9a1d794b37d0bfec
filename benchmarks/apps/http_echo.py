"""Bare aiohttp + uvloop + msgspec echo server: the HTTP ceiling and the load generator's check.

Run: python http_echo.py PORT   (listens on 127.0.0.1 only)
"""

import sys

import msgspec
import uvloop
from aiohttp import web

_dec = msgspec.json.Decoder()
_enc = msgspec.json.Encoder()


async def echo(request: web.Request) -> web.Response:
    body = _dec.decode(await request.read())
    return web.Response(body=_enc.encode({"output": body.get("input")}),
                        content_type="application/json")


app = web.Application(client_max_size=64 * 1024 * 1024)
app.router.add_post("/", echo)
app.router.add_post("/{tail:.*}", echo)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
            loop=uvloop.new_event_loop())
