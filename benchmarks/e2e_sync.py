"""e2e_sync: sync requests/s and p50/p99 through gateway + supervisor + child.

Trivial echo handler, 1 KB JSON, wrk (one thread) at concurrency 1 and 32,
over the multiplexed worker link and over the plain agent protocol.
Tail latency: a single p99 on a shared VM jumps (direct calls included), so
p99 is compared within rounds (our p99 / our p50, our p99 / runpod's p99 of
the same round) and the goal is on the median of those per-round ratios.
Baselines in the same run: runpod-python's local API server (handler in
process, no isolation) with the same handler and load, and a bare aiohttp
echo server (the HTTP ceiling, which is also the load generator's ceiling).
All servers are up at once and the wrk runs go round-robin over them, so a
machine whose speed drifts moves ours and the baselines alike.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
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
    median,
    median_load,
    result,
    servers,
    skipped,
    spawn,
    wait_ok,
    wrk,
    wrk_rounds_cpu,
)

SID = "bench"
KEY = "bench-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY = json.dumps({"input": {"data": "x" * 1000}}).encode()  # ≈ 1 KB


def start_gateway(procs: list[subprocess.Popen[bytes]], name: str = "gateway") -> str:
    port = free_port()
    procs.append(spawn([PY, "-m", "spirit_gpu.cli", "gateway", "--host", "127.0.0.1",
                        "--port", str(port), "--api-key", KEY], name))
    _wait_listening(port, procs[-1])
    return f"http://127.0.0.1:{port}"


def _wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
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


def start_worker(procs: list[subprocess.Popen[bytes]], gateway: str, transport: str,
                 sid: str = SID, **env: str) -> subprocess.Popen[bytes]:
    proc = spawn([PY, "-m", "spirit_gpu.supervisor", str(APPS / "echo.py")],
                 f"worker-{transport}", EASE_AGENT_URL=f"{gateway}/agent/{sid}",
                 SPIRIT_TRANSPORT=transport, BENCH_CONCURRENCY="64", **env)
    procs.append(proc)
    wait_ok(f"{gateway}/v1/{sid}/sync", BODY, AUTH, within=60, proc=proc)
    return proc


def measure_rounds(targets: dict[str, tuple[str, dict[str, str] | None]],
                   pids: dict[str, list[int]], quick: bool
                   ) -> tuple[dict[str, tuple[list[Load], list[Load]]], dict[str, float]]:
    """(c=1, c=32) loads of every round per target (bare aiohttp: c=32 only), and the
    CPU µs per request at c=32 of each target's processes."""
    runs, dur = (3, 2.0) if quick else (5, 5.0)
    keys = [(name, conns) for name in targets for conns in ((32,) if name == "bare" else (1, 32))]
    loads, cpu = wrk_rounds_cpu({(name, conns): (targets[name][0], BODY, targets[name][1], conns)
                                 for name, conns in keys},
                                {key: pids[key[0]] for key in keys if key[0] in pids}, runs, dur)
    return ({name: (loads.get((name, 1), loads[(name, 32)]), loads[(name, 32)])
             for name in targets},
            {name: us for (name, conns), us in cpu.items() if conns == 32})


def run(quick: bool) -> list[Result]:
    out: list[Result] = []
    targets: dict[str, tuple[str, dict[str, str] | None]] = {}
    with servers() as procs:
        port = free_port()
        procs.append(spawn([PY, str(APPS / "http_echo.py"), str(port)], "http_echo"))
        pids = {"bare": [procs[-1].pid]}
        echo_url = f"http://127.0.0.1:{port}/"
        wait_ok(echo_url, BODY, within=20, proc=procs[-1])
        try:
            wrk(echo_url, BODY, conns=1, duration=1)
        except Skip as exc:
            return [skipped("e2e_sync", str(exc))]
        targets["bare"] = (echo_url, None)

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
                targets["runpod"] = (rp_url, None)
                pids["runpod"] = [procs[-1].pid]
            except RuntimeError as exc:
                rp_why = f"runpod server did not start: {str(exc)[:120]}"

        # one gateway; each transport's worker serves a serverless id of its own
        gateway = start_gateway(procs)
        gateway_index = len(procs) - 1
        for transport in ("link", "plain"):
            sid = f"{SID}-{transport}"
            worker = start_worker(procs, gateway, transport, sid)
            pids[transport] = [procs[gateway_index].pid, worker.pid]
            targets[transport] = (f"{gateway}/v1/{sid}/sync", AUTH)
        rounds, cpu_us = measure_rounds(targets, pids, quick)

    loads = {name: (median_load(c1), median_load(c32)) for name, (c1, c32) in rounds.items()}
    bare = loads["bare"][1]
    out.append(result("load generator ceiling: wrk → bare aiohttp, c=32", bare.rps, "req/s",
                      goal=f"report (p50 {bare.p50_ms:.2f} ms)"))
    ours = {t: loads[t] for t in ("link", "plain")}
    rp = loads.get("runpod")
    link1, link32 = ours["link"]
    plain1, plain32 = ours["plain"]
    link_rounds = rounds["link"][1]
    rp_name = "runpod local API"
    tail = median([x.p99_ms / x.p50_ms for x in link_rounds])
    out.append(result("e2e_sync link c=32 p99 / p50 (median over rounds)", link32.p99_ms, "ms",
                      "link c=32 p50, same round", link32.p50_ms, ratio=tail,
                      target=("<=", 4.0)))
    if rp is not None:
        rp1, rp32 = rp
        out.append(result("e2e_sync link c=32", link32.rps, "req/s", rp_name + " c=32", rp32.rps,
                          target=(">=", 2.0)))
        out.append(result("e2e_sync link c=1 p50", link1.p50_ms, "ms", rp_name + " c=1 p50",
                          rp1.p50_ms, target=("<=", 1.5)))
        vs_rp = median([ours_.p99_ms / theirs.p99_ms
                        for ours_, theirs in zip(link_rounds, rounds["runpod"][1], strict=True)])
        out.append(result("e2e_sync link c=32 p99 vs runpod (median over rounds)",
                          link32.p99_ms, "ms", rp_name + " c=32 p99, same round", rp32.p99_ms,
                          ratio=vs_rp, target=("<=", 1.0)))
        out.append(result("e2e_sync plain c=32", plain32.rps, "req/s", rp_name + " c=32",
                          rp32.rps))
        out.append(result("e2e_sync plain c=1 p50", plain1.p50_ms, "ms", rp_name + " c=1 p50",
                          rp1.p50_ms))
    else:
        out.append(skipped("e2e_sync link c=32", rp_why, "req/s", rp_name + " c=32",
                           target=(">=", 2.0)))
        out.append(skipped("e2e_sync link c=1 p50", rp_why, "ms", rp_name + " c=1 p50",
                           target=("<=", 1.5)))
        out.append(skipped("e2e_sync link c=32 p99 vs runpod (median over rounds)", rp_why, "ms",
                           rp_name + " c=32 p99, same round", target=("<=", 1.0)))
    out.append(result("e2e_sync link c=32 vs HTTP ceiling", link32.rps, "req/s",
                      "bare aiohttp c=32", bare.rps, target=(">=", 0.4)))
    out.append(result("e2e_sync link c=1", link1.rps, "req/s",
                      goal=f"report (p50 {link1.p50_ms:.2f} ms, p99 {link1.p99_ms:.2f} ms)"))
    out.append(result("e2e_sync plain c=32 p50 / p99", plain32.p50_ms, "ms",
                      goal=f"report (p99 {plain32.p99_ms:.2f} ms)"))
    for name, label in (("runpod", rp_name), ("bare", "bare aiohttp")):
        if "link" in cpu_us and name in cpu_us:
            out.append(result("e2e_sync link c=32: CPU per request (gateway + supervisor + "
                              "child)", cpu_us["link"], "µs", f"{label} CPU per request",
                              cpu_us[name]))
    errors = sum(x.errors for name in ("link", "plain") for pair in rounds[name] for x in pair)
    out.append(result("e2e_sync failed responses", errors, "", target=("==", 0)))
    return out


if __name__ == "__main__":
    main_for(run, "e2e_sync")
