"""soak: steady mixed traffic against a gateway and one worker for a long time,
sampling their memory and open files; a CSV and a PNG of both over time.

    python benchmarks/soak.py --minutes 30 [--out docs/images/soak]

Not part of ``benchmarks/run.py`` (it takes as long as you ask). The gateway
(``spirit-gpu gateway``) and the supervisor (``python -m spirit_gpu.supervisor``
with ``apps/soak_worker.py``, 4 handler processes) are real processes on
127.0.0.1. Traffic: async requests with a webhook (to a receiver in this
process), sync requests, and generator requests read through
``GET /v1/<sid>/stream``, each arriving at its own steady rate; every ``--kill-every`` seconds
a random handler process is SIGKILLed. Every ``--sample`` seconds the gateway's
and the supervisor's RSS and open fds (and the handler processes' total RSS)
are read from /proc. The gateway keeps finished requests ``--retention``
seconds (60 by default, not the 30-minute default), so its memory reaches a
steady state within the first minutes: growth after that is a leak.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import APPS, PY, ROOT, free_port, machine, servers, spawn, wait_ok  # noqa: E402

SID = "soak"
KEY = "soak-key"
TOKEN = "soak-token"
AUTH = {"Authorization": f"Bearer {KEY}"}
COLUMNS = ["t_s", "gateway_rss_mib", "gateway_fds", "supervisor_rss_mib", "supervisor_fds",
           "children", "children_rss_mib", "sent", "answered", "errors", "webhooks",
           "streams_ended", "kills"]


def rss_mib(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


@dataclass
class Counts:
    sent: int = 0
    answered: int = 0
    errors: int = 0
    webhooks: int = 0
    streams_ended: int = 0
    kills: int = 0
    rows: list[dict[str, float]] = field(default_factory=list)


class Soak:
    def __init__(self, ns: argparse.Namespace, gateway_pid: int, supervisor_pid: int,
                 base: str) -> None:
        self.ns = ns
        self.gw = gateway_pid
        self.sup = supervisor_pid
        self.base = base
        self.rng = random.Random(ns.seed)
        self.c = Counts()
        self.stop = asyncio.Event()
        self.hook = ""
        self.tasks: set[asyncio.Task[None]] = set()

    async def _post(self, path: str, body: dict[str, object]) -> dict[str, object] | None:
        self.c.sent += 1
        try:
            async with self.session.post(f"{self.base}{path}", json=body, headers=AUTH,
                                         timeout=aiohttp.ClientTimeout(total=60)) as r:
                data = await r.json(content_type=None)
                if r.status == 200:
                    self.c.answered += 1
                    return data if isinstance(data, dict) else {"result": data}
                self.c.errors += 1
        except (aiohttp.ClientError, TimeoutError, ValueError):
            self.c.errors += 1
        return None

    def _input(self, n: int) -> dict[str, object]:
        return {"n": n, "sleep": 0.005, "pad": self.rng.choice((0, 100, 10_000))}

    async def _one(self, kind: str) -> None:
        if kind == "sync":
            await self._post(f"/v1/{SID}/sync", {"input": self._input(self.rng.randint(1, 3))})
            return
        stream = kind == "stream"
        n = 5 if stream else self.rng.randint(1, 3)
        body: dict[str, object] = {"input": self._input(n), "webhook": self.hook}
        accepted = await self._post(f"/v1/{SID}/async", body)
        if stream and accepted is not None:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self.session.get(
                        f"{self.base}/v1/{SID}/stream", params={"requestID": str(accepted["id"])},
                        headers=AUTH, timeout=aiohttp.ClientTimeout(total=60)) as r:
                    async for line in r.content:
                        if line.startswith(b"event: end"):
                            self.c.streams_ended += 1

    async def _arrivals(self, per_s: float, kind: str) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.rng.expovariate(per_s))
            if self.stop.is_set():
                break
            task = asyncio.ensure_future(self._one(kind))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _kills(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.ns.kill_every)
            kids = children_of(self.sup)
            if kids and not self.stop.is_set():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.rng.choice(kids), signal.SIGKILL)
                    self.c.kills += 1

    def _sample(self, t: float) -> dict[str, float]:
        kids = children_of(self.sup)
        row = {"t_s": round(t, 1), "gateway_rss_mib": round(rss_mib(self.gw), 2),
               "gateway_fds": fds(self.gw), "supervisor_rss_mib": round(rss_mib(self.sup), 2),
               "supervisor_fds": fds(self.sup), "children": len(kids),
               "children_rss_mib": round(sum(rss_mib(k) for k in kids), 2),
               "sent": self.c.sent, "answered": self.c.answered, "errors": self.c.errors,
               "webhooks": self.c.webhooks, "streams_ended": self.c.streams_ended,
               "kills": self.c.kills}
        self.c.rows.append(row)
        return row

    async def _receive(self, request: web.Request) -> web.Response:
        await request.read()
        self.c.webhooks += 1
        return web.Response(text="ok")

    async def run(self) -> Counts:
        app = web.Application()
        app.router.add_post("/hook", self._receive)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        self.hook = f"http://127.0.0.1:{port}/hook"
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100))
        ns = self.ns
        loops = [asyncio.ensure_future(c) for c in (
            self._arrivals(ns.async_rate, "async"), self._arrivals(ns.sync_rate, "sync"),
            self._arrivals(ns.stream_rate, "stream"), self._kills())]
        t0 = time.monotonic()
        end = t0 + ns.minutes * 60
        try:
            while True:
                row = self._sample(time.monotonic() - t0)
                print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
                if time.monotonic() >= end:
                    break
                await asyncio.sleep(min(ns.sample, max(0.0, end - time.monotonic())))
        finally:
            self.stop.set()
            await asyncio.gather(*loops, return_exceptions=True)
            if self.tasks:
                await asyncio.wait(self.tasks, timeout=30)
            await self.session.close()
            await runner.cleanup()
        return self.c


def write_csv(path: Path, rows: list[dict[str, float]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def slope_per_hour(rows: list[dict[str, float]], key: str, after_s: float) -> float:
    """Least-squares growth of ``key`` per hour over the samples after ``after_s``."""
    pts = [(r["t_s"], r[key]) for r in rows if r["t_s"] >= after_s]
    if len(pts) < 2:
        return 0.0
    mx = sum(t for t, _ in pts) / len(pts)
    my = sum(v for _, v in pts) / len(pts)
    den = sum((t - mx) ** 2 for t, _ in pts)
    return 0.0 if den == 0 else sum((t - mx) * (v - my) for t, v in pts) / den * 3600


def plot(path: Path, rows: list[dict[str, float]], title: str, warm_min: float) -> None:
    """RSS above, fds below; a dotted line where the steady state should have begun."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t_s"] / 60 for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    for key, label in (("gateway_rss_mib", "gateway"), ("supervisor_rss_mib", "supervisor"),
                       ("children_rss_mib", "handler processes (sum)")):
        top.plot(t, [r[key] for r in rows], label=label)
    for ax in (top, bottom):
        ax.axvline(warm_min, color="grey", linestyle=":", linewidth=1)
    top.set_ylabel("RSS (MiB)")
    top.set_ylim(bottom=0)
    top.legend(loc="upper left")
    top.grid(alpha=0.3)
    for key, label in (("gateway_fds", "gateway"), ("supervisor_fds", "supervisor")):
        bottom.plot(t, [r[key] for r in rows], label=label)
    bottom.set_ylabel("open fds")
    bottom.set_xlabel("minutes")
    bottom.set_ylim(bottom=0)
    bottom.legend(loc="upper left")
    bottom.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--out", default="soak", help="path prefix of the .csv and .png (soak)")
    ap.add_argument("--sample", type=float, default=5.0, help="seconds between samples (5)")
    ap.add_argument("--async-rate", type=float, default=10.0, help="async requests/s (10)")
    ap.add_argument("--stream-rate", type=float, default=1.0, help="streamed requests/s (1)")
    ap.add_argument("--sync-rate", type=float, default=10.0, help="sync requests/s (10)")
    ap.add_argument("--kill-every", type=float, default=20.0,
                    help="seconds between handler-process SIGKILLs (20)")
    ap.add_argument("--retention", type=float, default=60.0,
                    help="the gateway's --result-retention in seconds (60)")
    ap.add_argument("--seed", type=int, default=None)
    ns = ap.parse_args()
    ns.seed = ns.seed if ns.seed is not None else random.SystemRandom().randrange(10**6)
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    print(f"soak: {ns.minutes:g} min, seed {ns.seed}, {machine()}", flush=True)
    with servers() as procs:
        gateway = spawn([PY, "-m", "spirit_gpu.cli", "gateway", "--port", str(port),
                         "--api-key", KEY, "--worker-token", TOKEN,
                         "--result-retention", str(ns.retention)], "soak-gateway")
        procs.append(gateway)
        wait_ok(f"{base}/healthz", b"", method="GET", proc=gateway)
        worker = spawn([PY, "-m", "spirit_gpu.supervisor", str(APPS / "soak_worker.py")],
                       "soak-worker", EASE_AGENT_URL=f"{base}/agent/{SID}",
                       SPIRIT_WORKER_TOKEN=TOKEN, SPIRIT_MAX_CHILDREN="4",
                       SPIRIT_MIN_CHILDREN="4", SOAK_CONCURRENCY="4",
                       SPIRIT_CRASH_BACKOFF_MAX="2")
        procs.append(worker)
        wait_ok(f"{base}/v1/{SID}/sync", b'{"input": {"n": 1}}', AUTH, within=60, proc=worker)
        counts = asyncio.run(Soak(ns, gateway.pid, worker.pid, base).run())
    rows = counts.rows
    csv_path, png_path = out.with_suffix(".csv"), out.with_suffix(".png")
    write_csv(csv_path, rows)
    info = machine()
    title = (f"soak: {ns.minutes:g} min of mixed traffic (async {ns.async_rate:g}/s, sync "
             f"{ns.sync_rate:g}/s, stream {ns.stream_rate:g}/s), a handler SIGKILL every "
             f"{ns.kill_every:g} s, results kept {ns.retention:g} s\n{info['cpus']} CPUs "
             f"({info['processor']}), Python {info['python']}")
    warm = min(2 * ns.retention, ns.minutes * 60 / 2)
    plot(png_path, rows, title, warm / 60)
    last = rows[-1]
    print(f"\nsoak done: {last['sent']} requests sent, {last['answered']} answered 200, "
          f"{last['errors']} errors, {last['webhooks']} webhooks, {last['streams_ended']} "
          f"streams ended, {last['kills']} handler kills")
    for key in ("gateway_rss_mib", "supervisor_rss_mib", "gateway_fds", "supervisor_fds"):
        series = [r[key] for r in rows]
        print(f"{key}: first {series[0]:g}, max {max(series):g}, last {series[-1]:g}; after "
              f"{warm:g} s: {slope_per_hour(rows, key, warm):+.2f} per hour")
    print(f"wrote {csv_path} and {png_path} (root {ROOT})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
