"""proxy_overhead: what the proxy path adds over calling the LLM server directly.

A fake LLM server (aiohttp + uvloop, in this file: ``--serve-upstream PORT``)
answers ``POST /api/chat`` with a small JSON body and ``POST /api/generate``
with a 20-line NDJSON stream (no delays: this measures the proxy, not a
model). Three ways to reach it, same wrk load (one thread, 1 KB JSON body,
concurrency 1 and 32):

* direct: the client calls the fake LLM server;
* worker: the client calls the worker's proxy listener (one hop; a real
  ``python -m spirit_gpu.supervisor`` in proxy mode, INFO logging: one log
  line per request, as users run it);
* gateway (link): ``Auth: <sid>-<key>`` to the real gateway, which routes to
  that worker over its proxy link (the full path: two hops);
* gateway (http): the same through a second worker with
  ``SPIRIT_TRANSPORT=plain``: the gateway opens HTTP connections to its listener.

All processes share this machine's CPUs with wrk (and, on a shared box, with
whatever else runs), so besides requests/s and p50 it reports the CPU time
each process spent per request (from /proc), which load elsewhere does not
move much: that is the cost of the path.

Run: python benchmarks/proxy_overhead.py [--quick] [--json PATH]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    PY,
    Load,
    Result,
    free_port,
    main_for,
    result,
    servers,
    spawn,
    wait_ok,
    wrk_median,
)

SID = "bench"
KEY = "bench-key"
BODY = json.dumps({"model": "m", "prompt": "x" * 1000}).encode()  # ≈ 1 KB
THIS = Path(__file__).resolve()

APP = """
import os
from spirit_gpu import start

def check_start():
    return True

start({"mode": "proxy", "base_url": os.environ["LLM_URL"], "check_start": check_start})
"""


def serve_upstream(port: int) -> None:
    import msgspec
    import uvloop
    from aiohttp import web

    answer = msgspec.json.encode({"model": "m", "created_at": "2024-01-01T00:00:00Z",
                                  "message": {"role": "assistant", "content": "hello " * 20},
                                  "done": True})
    lines = [msgspec.json.encode({"model": "m", "response": f"tok{i} ", "done": False}) + b"\n"
             for i in range(19)] + [msgspec.json.encode({"model": "m", "done": True}) + b"\n"]

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=answer, content_type="application/json")

    async def generate(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        for line in lines:
            await resp.write(line)
        await resp.write_eof()
        return resp

    async def root(request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    app = web.Application()
    app.router.add_get("/", root)
    app.router.add_post("/api/chat", chat)
    app.router.add_post("/api/generate", generate)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None,
                loop=uvloop.new_event_loop())


def cpu_seconds(proc: subprocess.Popen[bytes]) -> float:
    fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(quick: bool) -> list[Result]:
    runs, dur = (3, 2.0) if quick else (3, 5.0)
    results: list[Result] = []
    with servers() as procs, tempfile.TemporaryDirectory() as tmp:
        up_port, gw_port, wk_port = free_port(), free_port(), free_port()
        upstream = f"http://127.0.0.1:{up_port}"
        procs.append(spawn([PY, str(THIS), "--serve-upstream", str(up_port)], "proxy-upstream"))
        wait_ok(upstream + "/api/chat", BODY, within=30, proc=procs[-1])
        gateway = f"http://127.0.0.1:{gw_port}"
        procs.append(spawn([PY, "-m", "spirit_gpu.cli", "gateway", "--host", "127.0.0.1",
                            "--port", str(gw_port), "--api-key", KEY], "proxy-gateway"))
        app = Path(tmp) / "proxy_app.py"
        app.write_text(APP)
        procs.append(spawn([PY, "-m", "spirit_gpu.supervisor", str(app)], "proxy-worker",
                           EASE_AGENT_URL=f"{gateway}/agent/{SID}", LLM_URL=upstream,
                           SPIRIT_PROXY_PORT=str(wk_port), EASE_LOG_LEVEL="INFO"))
        procs.append(spawn([PY, "-m", "spirit_gpu.supervisor", str(app)], "proxy-worker-http",
                           EASE_AGENT_URL=f"{gateway}/agent/{SID}http", LLM_URL=upstream,
                           SPIRIT_TRANSPORT="plain", EASE_LOG_LEVEL="INFO"))
        worker = f"http://127.0.0.1:{wk_port}"
        auth = {"Auth": f"{SID}-{KEY}"}
        auth_http = {"Auth": f"{SID}http-{KEY}"}
        wait_ok(gateway + "/api/chat", BODY, auth, within=60, proc=procs[2])
        wait_ok(gateway + "/api/chat", BODY, auth_http, within=60, proc=procs[3])

        named = {"upstream": procs[0], "gateway": procs[1], "worker": procs[2],
                 "worker (http)": procs[3]}

        def measure(url: str, headers: dict[str, str] | None, conns: int
                    ) -> tuple[Load, dict[str, float]]:
            before = {name: cpu_seconds(p) for name, p in named.items()}
            load = wrk_median(url, BODY, headers, conns=conns, duration=dur, runs=runs)
            done = load.rps * dur * runs  # about the number of requests served
            return load, {name: (cpu_seconds(p) - before[name]) / done * 1e6
                          for name, p in named.items()}

        for path, what in (("/api/chat", "JSON answer"), ("/api/generate", "20-line NDJSON")):
            for conns in (1, 32):
                direct, direct_cpu = measure(upstream + path, None, conns)
                loads: dict[str, tuple[Load, dict[str, float]]] = {
                    "worker": measure(worker + path, None, conns),
                    "gateway (link)": measure(gateway + path, auth, conns),
                    "gateway (http)": measure(gateway + path, auth_http, conns),
                }
                if conns == 1:
                    results.append(result(f"proxy {what}: LLM server CPU per request",
                                          direct_cpu["upstream"], "µs"))
                for via, (load, cpu) in loads.items():
                    hops = {"worker": ("worker",), "gateway (link)": ("worker", "gateway"),
                            "gateway (http)": ("worker (http)", "gateway")}[via]
                    if conns == 1:
                        for hop in hops:
                            results.append(result(
                                f"proxy {what} via {via}: {hop} CPU per request", cpu[hop],
                                "µs", "LLM server CPU per request", direct_cpu["upstream"]))
                    base = f"direct c={conns}"
                    results.append(result(f"proxy {what} via {via}, c={conns}", load.rps,
                                          "req/s", base, direct.rps))
                    results.append(result(
                        f"proxy {what} via {via}, c={conns}, added p50 latency",
                        load.p50_ms - direct.p50_ms, "ms", f"direct p50 {direct.p50_ms:.3g} ms",
                        direct.p50_ms, ratio=load.p50_ms / direct.p50_ms if direct.p50_ms
                        else None))
                    if load.errors:
                        raise RuntimeError(f"{via} {path} c={conns}: {load.errors} errors")
    return results


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-upstream":
        serve_upstream(int(sys.argv[2]))
    else:
        main_for(run, "proxy overhead: gateway + worker listener vs direct")
