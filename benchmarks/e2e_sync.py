"""e2e_sync: sync requests/s and p50/p99 through gateway + supervisor + child.

Trivial echo handler, 1 KB JSON, wrk (one thread) at concurrency 1 and 32,
over the multiplexed worker link and over the plain agent protocol.
Baselines in the same run: runpod-python's local API server (handler in
process, no isolation) with the same handler and load, and a bare aiohttp
echo server (the HTTP ceiling, which is also the load generator's ceiling).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    APPS,
    PY,
    Load,
    Result,
    Skip,
    free_port,
    main_for,
    result,
    servers,
    skipped,
    spawn,
    stop,
    wait_ok,
    wrk_median,
)

SID = "bench"
KEY = "bench-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY = json.dumps({"input": {"data": "x" * 1000}}).encode()  # ≈ 1 KB


def start_gateway(procs: list, name: str = "gateway") -> str:  # noqa: ANN001
    port = free_port()
    procs.append(spawn([PY, "-m", "spirit_gpu.cli", "gateway", "--host", "127.0.0.1",
                        "--port", str(port), "--api-key", KEY], name))
    url = f"http://127.0.0.1:{port}"
    wait_ok(f"{url}/v1/{SID}/status?requestID=x", b"", within=30, proc=procs[-1], method="GET") \
        if False else _wait_listening(port, procs[-1])
    return url


def _wait_listening(port: int, proc) -> None:  # noqa: ANN001
    import socket
    import time

    end = time.monotonic() + 30
    while time.monotonic() < end:
        if proc.poll() is not None:
            from common import log_tail
            raise RuntimeError(f"gateway exited: {log_tail(proc)}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("gateway did not listen within 30 s")


def start_worker(procs: list, gateway: str, transport: str, **env: str):  # noqa: ANN001, ANN201
    proc = spawn([PY, "-m", "spirit_gpu.supervisor", str(APPS / "echo.py")],
                 f"worker-{transport}", EASE_AGENT_URL=f"{gateway}/agent/{SID}",
                 SPIRIT_TRANSPORT=transport, BENCH_CONCURRENCY="64", **env)
    procs.append(proc)
    wait_ok(f"{gateway}/v1/{SID}/sync", BODY, AUTH, within=60, proc=proc)
    return proc


def measure_pair(url: str, headers: dict[str, str] | None, quick: bool) -> tuple[Load, Load]:
    runs, dur = (3, 2.0) if quick else (5, 5.0)
    c1 = wrk_median(url, BODY, headers, conns=1, duration=dur, runs=runs)
    c32 = wrk_median(url, BODY, headers, conns=32, duration=dur, runs=runs)
    return c1, c32


def run(quick: bool) -> list[Result]:
    out: list[Result] = []
    runs, dur = (3, 2.0) if quick else (5, 5.0)
    with servers() as procs:
        port = free_port()
        procs.append(spawn([PY, str(APPS / "http_echo.py"), str(port)], "http_echo"))
        echo_url = f"http://127.0.0.1:{port}/"
        wait_ok(echo_url, BODY, within=20, proc=procs[-1])
        try:
            bare = wrk_median(echo_url, BODY, conns=32, duration=dur, runs=runs)
        except Skip as exc:
            return [skipped("e2e_sync", str(exc))]
        out.append(result("load generator ceiling: wrk → bare aiohttp, c=32", bare.rps, "req/s",
                          goal=f"report (p50 {bare.p50_ms:.2f} ms)"))
        stop(procs.pop())

        rp: tuple[Load, Load] | None = None
        rp_why = ""
        if importlib.util.find_spec("runpod") is None:
            rp_why = "runpod not installed (run benchmarks/install.sh)"
        else:
            port = free_port()
            procs.append(spawn([PY, str(APPS / "rp_echo.py"), "--rp_serve_api",
                                "--rp_api_host", "127.0.0.1", "--rp_api_port", str(port)],
                               "runpod", BENCH_CONCURRENCY="64"))
            rp_url = f"http://127.0.0.1:{port}/runsync"
            try:
                wait_ok(rp_url, BODY, within=60, proc=procs[-1])
                rp = measure_pair(rp_url, None, quick)
            except RuntimeError as exc:
                rp_why = f"runpod server did not start: {str(exc)[:120]}"
            stop(procs.pop())

        gateway = start_gateway(procs)
        sync_url = f"{gateway}/v1/{SID}/sync"
        ours: dict[str, tuple[Load, Load]] = {}
        for transport in ("link", "plain"):
            worker = start_worker(procs, gateway, transport)
            ours[transport] = measure_pair(sync_url, AUTH, quick)
            stop(worker)
            procs.remove(worker)

    link1, link32 = ours["link"]
    plain1, plain32 = ours["plain"]
    rp_name = "runpod local API"
    if rp is not None:
        rp1, rp32 = rp
        out.append(result("e2e_sync link c=32", link32.rps, "req/s", rp_name + " c=32", rp32.rps,
                          "≥ 1.0×", lambda r: r >= 1.0))
        out.append(result("e2e_sync link c=1 p50", link1.p50_ms, "ms", rp_name + " c=1 p50",
                          rp1.p50_ms, "≤ 2×", lambda r: r <= 2.0))
        out.append(result("e2e_sync plain c=32", plain32.rps, "req/s", rp_name + " c=32",
                          rp32.rps))
        out.append(result("e2e_sync plain c=1 p50", plain1.p50_ms, "ms", rp_name + " c=1 p50",
                          rp1.p50_ms))
    else:
        out.append(skipped("e2e_sync link c=32 vs runpod", rp_why, "req/s", rp_name, "≥ 1.0×"))
        out.append(skipped("e2e_sync link c=1 p50 vs runpod", rp_why, "ms", rp_name, "≤ 2×"))
    out.append(result("e2e_sync link c=32 vs HTTP ceiling", link32.rps, "req/s",
                      "bare aiohttp c=32", bare.rps, "≥ 0.25×", lambda r: r >= 0.25))
    out.append(result("e2e_sync link c=32 p50 / p99", link32.p50_ms, "ms",
                      goal=f"report (p99 {link32.p99_ms:.2f} ms)"))
    out.append(result("e2e_sync link c=1", link1.rps, "req/s",
                      goal=f"report (p99 {link1.p99_ms:.2f} ms)"))
    out.append(result("e2e_sync plain c=32 p50 / p99", plain32.p50_ms, "ms",
                      goal=f"report (p99 {plain32.p99_ms:.2f} ms)"))
    errors = sum(x.errors for pair in ours.values() for x in pair)
    out.append(result("e2e_sync failed responses", errors, "", goal="0", check=lambda v: v == 0))
    return out


if __name__ == "__main__":
    main_for(run, "e2e_sync")
