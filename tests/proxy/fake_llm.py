"""A small real LLM-server stand-in: ollama NDJSON, OpenAI SSE, and test helpers.

Streams are written chunk by chunk with a delay between chunks. A request may
name a gate (``X-Gate: <name>``): the server waits for ``gates[name]`` before
writing its last chunk, so a test can prove the first chunk reached the
client while the last one was not written yet (``X-Gate-First``: before the
first chunk, after the head). ``X-Tag`` names a request in
the records (``seen``, ``aborted``, ``finished``).
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class FakeLLM:
    url: str = ""
    seen: list[dict[str, Any]] = field(default_factory=list)
    aborted: set[str] = field(default_factory=set)
    finished: set[str] = field(default_factory=set)
    written: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    gates: dict[str, asyncio.Event] = field(default_factory=dict)

    def gate(self, name: str) -> asyncio.Event:
        return self.gates.setdefault(name, asyncio.Event())

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/", self.root)
        app.router.add_post("/api/generate", self.generate)
        app.router.add_post("/api/chat", self.chat)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        for prefix in ("/api", "/v1"):
            app.router.add_route("*", prefix + "/echo/{tail:.*}", self.echo)
            app.router.add_post(prefix + "/slow-head", self.slow_head)
        return app

    def _record(self, request: web.Request, body: bytes) -> str:
        tag = request.headers.get("X-Tag", f"r{len(self.seen)}")
        self.seen.append({"tag": tag, "method": request.method, "path": request.path,
                          "query": request.query_string, "headers": dict(request.headers),
                          "body_len": len(body)})
        return tag

    async def root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def _stream(self, request: web.Request, tag: str, chunks: list[bytes],
                      content_type: str, delay: float) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": content_type})
        gate = request.headers.get("X-Gate")
        first_gate = request.headers.get("X-Gate-First")
        try:
            await resp.prepare(request)  # aiohttp sends a StreamResponse's head at once
            if first_gate:
                await self.gate(first_gate).wait()
            for i, chunk in enumerate(chunks):
                if i == len(chunks) - 1 and gate:
                    await self.gate(gate).wait()
                elif i:
                    await asyncio.sleep(delay)
                await resp.write(chunk)
                self.written[tag] += 1
            await resp.write_eof()
        except (asyncio.CancelledError, ConnectionError):
            self.aborted.add(tag)
            raise
        self.finished.add(tag)
        return resp

    async def generate(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        tag = self._record(request, raw)
        body = json.loads(raw or b"{}")
        n, delay = int(body.get("chunks", 5)), float(body.get("delay", 0.01))
        model = body.get("model", "llama3.2")
        if body.get("stream") is False:
            return web.json_response({"model": model, "response": "word " * n, "done": True})
        chunks = [json.dumps({"model": model, "response": f"w{i} ", "done": False}).encode()
                  + b"\n" for i in range(n)]
        chunks.append(json.dumps({"model": model, "response": "", "done": True}).encode()
                      + b"\n")
        return await self._stream(request, tag, chunks, "application/x-ndjson", delay)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        tag = self._record(request, raw)
        body = json.loads(raw or b"{}")
        n, delay = int(body.get("chunks", 5)), float(body.get("delay", 0.01))
        chunks = [json.dumps({"message": {"role": "assistant", "content": f"w{i} "},
                              "done": False}).encode() + b"\n" for i in range(n)]
        chunks.append(json.dumps({"message": {"role": "assistant", "content": ""},
                                  "done": True}).encode() + b"\n")
        return await self._stream(request, tag, chunks, "application/x-ndjson", delay)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        tag = self._record(request, raw)
        body = json.loads(raw or b"{}")
        n, delay = int(body.get("chunks", 5)), float(body.get("delay", 0.01))
        if not body.get("stream"):
            return web.json_response({"object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "hello"}}]})
        chunks = [b"data: " + json.dumps({"object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": {"content": f"w{i} "}}]}).encode() + b"\n\n"
            for i in range(n)]
        chunks.append(b"data: [DONE]\n\n")
        return await self._stream(request, tag, chunks, "text/event-stream", delay)

    async def models(self, request: web.Request) -> web.Response:
        self._record(request, b"")
        return web.json_response({"object": "list", "data": [{"id": "llama3.2",
                                                               "object": "model"}]})

    async def echo(self, request: web.Request) -> web.Response:
        raw = await request.read()
        tag = self._record(request, raw)
        resp = web.json_response({"tag": tag, "method": request.method, "path": request.path,
                                  "raw_path": request.raw_path,
                                  "query": request.query_string,
                                  "headers": dict(request.headers), "body_len": len(raw)})
        if "set_cookie" in request.query:
            resp.set_cookie("session", request.query["set_cookie"])
        return resp

    async def slow_head(self, request: web.Request) -> web.Response:
        tag = self._record(request, await request.read())
        try:
            await self.gate(request.headers.get("X-Gate", "slow")).wait()
        except asyncio.CancelledError:
            self.aborted.add(tag)
            raise
        return web.json_response({"late": True})
