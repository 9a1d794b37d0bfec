"""A fake LLM that streams slowly, stamping every chunk: the scale benchmark's upstream.

``POST`` any path with ``{"chunks": N, "interval": S}``: an OpenAI-style SSE
answer of N chunks, one every S seconds on a fixed schedule (no drift), each
``data: {"t": <time.monotonic_ns() when written>, "i": k}`` so the client
measures each chunk's transit; then ``data: [DONE]``. ``GET /`` answers 200.
CLOCK_MONOTONIC is one clock for every process on the machine.

Run: python stream_llm.py PORT   (listens on 127.0.0.1 only)
"""

import asyncio
import json
import sys
import time

import uvloop
from aiohttp import web


async def root(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def stream(request: web.Request) -> web.StreamResponse:
    body = json.loads(await request.read() or b"{}")
    n, interval = int(body.get("chunks", 20)), float(body.get("interval", 0.05))
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(n):
        delay = start + (i + 1) * interval - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await resp.write(b'data: {"t": %d, "i": %d}\n\n' % (time.monotonic_ns(), i))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


app = web.Application()
app.router.add_get("/", root)
app.router.add_post("/{tail:.*}", stream)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
            loop=uvloop.new_event_loop(), backlog=4096)
