"""scale: many slow streams, a deep queue, many workers (how cost grows with work).

* streams: N concurrent streaming clients (1,000; --quick 200), each receiving
  20 chunks a second for 10 s (--quick 5 s) through gateway -> proxy worker ->
  a fake LLM that stamps every chunk with CLOCK_MONOTONIC when it writes it
  (apps/stream_llm.py). The client (this process, raw asyncio protocols on
  uvloop) takes each chunk's transit time. Baseline: the same load straight
  to the fake LLM, in the same run; "added" = our p99 - direct p99. Reports
  errors (non-200, connection lost, missing chunks) and the gateway's and
  worker's RSS per open stream (peak while all are open minus idle, / N).
* queue: Q async requests (20,000; --quick 5,000) to a serverless id with no
  worker, so all stay queued: gateway RSS per queued request beyond its body,
  and status lookup p50 with Q queued against a queue of one.
* workers: W simulated workers (200) on links to one gateway
  (apps/sim_workers.py: real LinkTransports in one process) against one
  worker, same process and gateway: sync requests/s with wrk (c=32),
  round-robin.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp  # noqa: E402
from common import (  # noqa: E402
    APPS,
    PY,
    Load,
    Result,
    free_port,
    log_tail,
    main_for,
    median,
    median_load,
    result,
    servers,
    skipped,
    spawn,
    tree_cpu_seconds,
    wait_ok,
    wrk,
)
from e2e_sync import AUTH, BODY, KEY, start_gateway  # noqa: E402

from spirit_gpu.loop import run as run_loop  # noqa: E402

SID = "scale"
RATE = 20.0  # chunks per second per stream
_STAMP = re.compile(rb'"t": (\d+), "i": \d+')


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))


# ---- streams -----------------------------------------------------------------------

class _Stream(asyncio.Protocol):
    """One streamed request over its own connection; records each chunk's transit (ms)."""

    def __init__(self, request: bytes, transits: list[float], done: asyncio.Future[str]) -> None:
        self.request = request
        self.transits = transits
        self.done = done
        self.head = b""
        self.buf = b""
        self.status = 0
        self.chunks = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        if not self.status:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            self.status = int(self.head[9:12])
            data, self.head = self.head[end + 4:], b""
            if self.status != 200:
                self._finish(f"status {self.status}")
                return
        buf = self.buf + data
        last = 0
        for m in _STAMP.finditer(buf):
            self.transits.append((now - int(m.group(1))) / 1e6)
            self.chunks += 1
            last = m.end()
        self.buf = buf[last:]
        if b"[DONE]" in self.buf:
            self._finish("")

    def _finish(self, error: str) -> None:
        if not self.done.done():
            self.done.set_result(error)
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(f"connection lost after {self.chunks} chunks: {exc!r}")


async def stream_load(port: int, headers: dict[str, str], clients: int, seconds: float,
                      pids: dict[str, int]) -> dict[str, Any]:
    """Open ``clients`` streams over ~2 s; transits, errors, peak RSS of ``pids``."""
    n_chunks = int(seconds * RATE)
    body = json.dumps({"model": "m", "stream": True, "chunks": n_chunks,
                       "interval": 1 / RATE}).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{head}"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
               f"Connection: close\r\n\r\n").encode() + body
    loop = asyncio.get_running_loop()
    transits: list[float] = []
    protos: list[_Stream] = []
    ramp = 2.0

    async def one(i: int) -> str:
        await asyncio.sleep(ramp * i / clients)
        done: asyncio.Future[str] = loop.create_future()
        try:
            _, proto = await loop.create_connection(
                lambda: _Stream(request, transits, done), "127.0.0.1", port)
        except OSError as exc:
            return f"connect: {exc!r}"
        protos.append(proto)
        try:
            error = await asyncio.wait_for(done, seconds + 60)
        except TimeoutError:
            proto.transport.close()
            return f"no end after {proto.chunks} chunks"
        if not error and proto.chunks != n_chunks:
            error = f"{proto.chunks} of {n_chunks} chunks"
        return error

    peak = {name: 0 for name in pids}

    async def sample() -> None:
        while True:
            for name, pid in pids.items():
                peak[name] = max(peak[name], rss_kib(pid))
            await asyncio.sleep(0.25)

    sampler = asyncio.create_task(sample())
    t0 = time.perf_counter()
    try:
        errors = [e for e in await asyncio.gather(*(one(i) for i in range(clients))) if e]
    finally:
        sampler.cancel()
    return {"transits": transits, "errors": errors, "peak": peak,
            "seconds": time.perf_counter() - t0, "expected": clients * n_chunks}


def streams(quick: bool) -> list[Result]:
    clients, seconds = (200, 5.0) if quick else (1000, 10.0)
    raise_fd_limit(4 * clients + 1024)
    label = f"{clients} streams × {RATE:g} chunks/s × {seconds:g} s"
    with servers() as procs:
        llm_port = free_port()
        procs.append(spawn([PY, str(APPS / "stream_llm.py"), str(llm_port)], "stream_llm"))
        llm = f"http://127.0.0.1:{llm_port}"
        warm = json.dumps({"chunks": 1, "interval": 0.001}).encode()
        wait_ok(llm + "/v1/chat/completions", warm, within=30, proc=procs[-1])
        gateway = start_gateway(procs, "scale-gateway")
        gw_proc = procs[-1]
        procs.append(spawn([PY, str(APPS / "proxy_worker.py")], "scale-worker",
                           EASE_AGENT_URL=f"{gateway}/agent/{SID}", PROXY_BASE_URL=llm))
        worker_proc = procs[-1]
        auth = {"Auth": f"{SID}-{KEY}"}
        wait_ok(gateway + "/v1/chat/completions", warm, auth, within=60, proc=worker_proc)
        for _ in range(20):  # warm pools and buffers before the idle RSS reading
            wait_ok(gateway + "/v1/chat/completions", warm, auth, within=10, proc=worker_proc)
        pids = {"gateway": gw_proc.pid, "worker": worker_proc.pid}
        idle = {name: rss_kib(pid) for name, pid in pids.items()}
        gw_port = int(gateway.rsplit(":", 1)[1])
        cpu0 = {name: tree_cpu_seconds(pid) for name, pid in pids.items()}
        ours = run_loop(stream_load(gw_port, auth, clients, seconds, pids))
        cpu = {name: tree_cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
        direct = run_loop(stream_load(llm_port, {}, clients, seconds, {}))
    p50, p99 = pct(ours["transits"], 0.5), pct(ours["transits"], 0.99)
    d50, d99 = pct(direct["transits"], 0.5), pct(direct["transits"], 0.99)
    errors = len(ours["errors"])
    out = [
        result(f"scale streams: errors ({label})", errors, "",
               goal="= 0" + (f" (first: {ours['errors'][0][:80]})" if errors else ""),
               target=("==", 0)),
        result("scale streams: added per-chunk latency p99", p99 - d99, "ms",
               goal=f"< 10 ms (p99 {p99:.2f} ms, direct p99 {d99:.2f} ms)", target=("<", 10.0)),
        result("scale streams: per-chunk latency p50 through gateway+worker", p50, "ms",
               "direct p50", d50, goal=f"report (chunks {len(ours['transits'])} of "
               f"{ours['expected']}; direct errors {len(direct['errors'])})"),
    ]
    chunks = max(1, len(ours["transits"]))
    for name in pids:
        out.append(result(f"scale streams: {name} CPU per chunk", cpu[name] / chunks * 1e6, "µs",
                          goal=f"report ({cpu[name] / ours['seconds']:.2f} CPU-seconds per "
                          "second)"))
    for name in pids:
        per = (ours["peak"][name] - idle[name]) * 1024 / clients
        out.append(result(f"scale streams: {name} RSS per open stream", per / 1024, "KiB",
                          goal=f"report (idle {idle[name] / 1024:.0f} MiB, peak "
                          f"{ours['peak'][name] / 1024:.0f} MiB)"))
    return out


# ---- queue -------------------------------------------------------------------------

async def queue_load(gateway: str, n: int) -> dict[str, float]:
    url = f"{gateway}/v1/{SID}-queue/async"
    status_url = f"{gateway}/v1/{SID}-queue/status"
    headers = {**AUTH, "Content-Type": "application/json"}
    # an async request needs a webhook; with no worker for this id it is never called
    body = json.dumps({"input": {"prompt": "x" * 64},
                       "webhook": "http://127.0.0.1:9/never-called"}).encode()
    ids: list[str] = []

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as s:
        async def submit(count: int) -> int:
            it = iter(range(count))
            refused = 0

            async def lane() -> None:
                nonlocal refused
                for _ in it:
                    async with s.post(url, data=body, headers=headers) as r:
                        data = await r.json()
                        if r.status != 200:
                            refused += 1
                            if refused == 1:
                                print(f"  async submission refused: {r.status} {data}")
                        else:
                            ids.append(data["id"])
            await asyncio.gather(*(lane() for _ in range(32)))
            return refused

        async def lookups(count: int) -> float:
            times = []
            for _ in range(count):
                rid = random.choice(ids)
                t0 = time.perf_counter()
                async with s.get(status_url, params={"requestID": rid}, headers=AUTH) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"status lookup answered {r.status}")
                times.append(time.perf_counter() - t0)
            return median(times) * 1000

        refused = await submit(50)  # warm-up: a few queued requests
        await asyncio.sleep(0.5)
        empty_ms = await lookups(300)
        before = await asyncio.to_thread(_gateway_rss)
        t0 = time.perf_counter()
        refused += await submit(n)
        submit_s = time.perf_counter() - t0
        await asyncio.sleep(0.5)
        after = await asyncio.to_thread(_gateway_rss)
        full_ms = await lookups(300)
        empty_again = empty_ms
    return {"empty_ms": empty_again, "full_ms": full_ms, "before": before, "after": after,
            "body": len(body), "refused": refused, "submit_s": submit_s}


_GATEWAY_PID = 0


def _gateway_rss() -> int:
    return rss_kib(_GATEWAY_PID)


def queue(quick: bool) -> list[Result]:
    global _GATEWAY_PID
    n = 5000 if quick else 20000
    with servers() as procs:
        gateway = start_gateway(procs, "queue-gateway")
        _GATEWAY_PID = procs[-1].pid
        m = run_loop(queue_load(gateway, n))
    per = (m["after"] - m["before"]) * 1024 / n - m["body"]
    return [
        result(f"scale queue: gateway RSS per queued request beyond its body ({n:,})", per, "B",
               goal=f"< 4096 B (body {m['body']:.0f} B)", target=("<", 4096)),
        result("scale queue: refused submissions", m["refused"], "", target=("==", 0)),
        result(f"scale queue: status lookup p50, {n:,} queued", m["full_ms"], "ms",
               "queue of 50", m["empty_ms"], target=("<=", 2.0)),
        result(f"scale queue: async submissions ({n:,})", n / m["submit_s"], "req/s"),
    ]


# ---- workers -----------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def workers(quick: bool) -> list[Result]:
    many = 200
    runs, dur = (3, 2.0) if quick else (5, 4.0)
    sids = {"one": f"{SID}-one", "many": f"{SID}-many"}
    loads: dict[str, list[Load]] = {k: [] for k in sids}
    cpu: dict[str, dict[str, float]] = {k: {"gateway": 0.0, "workers": 0.0} for k in sids}
    with servers() as procs, tempfile.TemporaryDirectory() as tmp:
        gateway = start_gateway(procs, "workers-gateway")
        ready = Path(tmp) / "ready"
        procs.append(spawn([PY, str(APPS / "sim_workers.py"), gateway, str(ready),
                            f"{sids['one']}:1", f"{sids['many']}:{many}"], "sim-workers"))
        end = time.monotonic() + 120
        while not ready.exists():
            if procs[-1].poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"simulated workers did not connect: {log_tail(procs[-1])}")
            time.sleep(0.1)
        for sid in sids.values():
            wait_ok(f"{gateway}/v1/{sid}/sync", BODY, AUTH, within=30, proc=procs[-1])
        pids = {"gateway": procs[0].pid, "workers": procs[1].pid}
        for _ in range(runs):  # round-robin, with each process's CPU time per run
            for key, sid in sids.items():
                before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                load = wrk(f"{gateway}/v1/{sid}/sync", BODY, AUTH, 32, dur)
                loads[key].append(load)
                for name, pid in pids.items():
                    cpu[key][name] += cpu_seconds(pid) - before[name]
    one, several = median_load(loads["one"]), median_load(loads["many"])
    served = {key: sum(x.rps for x in ls) * dur for key, ls in loads.items()}
    per = {key: {name: secs / served[key] * 1e6 for name, secs in c.items()}
           for key, c in cpu.items()}
    errors = sum(x.errors for ls in loads.values() for x in ls)
    return [
        result(f"scale workers: sync dispatch, {many} workers on links", several.rps,
               "req/s", "1 worker, same gateway", one.rps, target=(">=", 0.8)),
        result(f"scale workers: gateway CPU per request, {many} workers",
               per["many"]["gateway"], "µs", "1 worker", per["one"]["gateway"],
               goal=f"report (simulated workers' process: {per['many']['workers']:.0f} µs "
               f"vs {per['one']['workers']:.0f} µs)"),
        result("scale workers: failed responses", errors, "", target=("==", 0)),
    ]


def run(quick: bool) -> list[Result]:
    out: list[Result] = []
    if quick:
        print("  scale --quick: 200 streams for 5 s, 5,000 queued requests, 200 workers",
              flush=True)
    for part in (streams, queue, workers):
        try:
            out += part(quick)
        except Exception as exc:  # one part failing must not hide the others
            traceback.print_exc()
            out.append(skipped(f"scale {part.__name__}",
                               f"failed: {type(exc).__name__}: {str(exc)[:160]}"))
    return out


if __name__ == "__main__":
    main_for(run, "scale")
