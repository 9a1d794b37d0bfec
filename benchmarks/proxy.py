"""proxy: gateway -> proxy worker -> fake LLM server (tests/proxy/fake_llm.py).

Non-streamed (POST /v1/chat/completions, stream false) and streamed
(POST /api/generate, 5 NDJSON chunks) requests/s with wrk at concurrency 32,
and time-to-first-chunk (aiohttp client, one in flight, chunks 5 ms apart).
Baselines in the same run: the fake LLM server called directly; nginx as one
reverse-proxy hop in front of it (upstream keep-alive); a plain single-hop
aiohttp reverse proxy (apps/aiohttp_proxy.py).

The wrk runs go round-robin over the targets (run 1 of each, then run 2, ...)
and the time-to-first-chunk requests alternate between direct and proxied, so
that a machine whose speed drifts during the benchmark (a shared VM) moves
ours and the baselines alike; each figure is still the median of its runs.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp  # noqa: E402
from common import (  # noqa: E402
    APPS,
    PY,
    Result,
    free_port,
    main_for,
    median,
    result,
    servers,
    skipped,
    spawn,
    wait_ok,
    wrk_round_robin,
)
from e2e_sync import KEY, start_gateway  # noqa: E402

from spirit_gpu.loop import run as run_loop  # noqa: E402

SID = "bench"
AUTH = {"Auth": f"{SID}-{KEY}"}
PLAIN = ("/v1/chat/completions", json.dumps({"model": "m", "stream": False}).encode())
STREAM = ("/api/generate", json.dumps({"model": "m", "prompt": "hi", "chunks": 5,
                                       "delay": 0}).encode())
TTFC = ("/api/generate", json.dumps({"model": "m", "prompt": "hi", "chunks": 3,
                                     "delay": 0.005}).encode())

NGINX_CONF = """worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  upstream llm {{ server 127.0.0.1:{upstream}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://llm;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"""


async def ttfc(targets: dict[str, tuple[str, dict[str, str]]], n: int) -> dict[str, float]:
    """Median seconds from sending a streamed request to its first body chunk, per target
    (one request to each in turn, one session each)."""
    path, body = TTFC
    times: dict[str, list[float]] = {name: [] for name in targets}
    sessions = {name: aiohttp.ClientSession() for name in targets}
    try:
        for i in range(n + 5):
            for name, (url, headers) in targets.items():
                t0 = time.perf_counter()
                async with sessions[name].post(url + path, data=body, headers=headers) as r:
                    await r.content.readany()
                    t = time.perf_counter() - t0
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"TTFC request to {name} failed: {r.status}")
                if i >= 5:
                    times[name].append(t)
    finally:
        for session in sessions.values():
            await session.close()
    return {name: median(ts) for name, ts in times.items()}


def run(quick: bool) -> list[Result]:
    runs, dur, n_ttfc = (3, 2.0, 100) if quick else (5, 5.0, 300)
    rps: dict[str, dict[str, float]] = {}
    notes: dict[str, str] = {}
    with servers() as procs, tempfile.TemporaryDirectory() as tmp:
        llm_port = free_port()
        procs.append(spawn([PY, str(APPS / "fake_llm_server.py"), str(llm_port)], "fake_llm"))
        llm = f"http://127.0.0.1:{llm_port}"
        wait_ok(llm + PLAIN[0], PLAIN[1], within=30, proc=procs[-1])
        targets: dict[str, tuple[str, dict[str, str]]] = {"direct": (llm, {})}

        port = free_port()
        procs.append(spawn([PY, str(APPS / "aiohttp_proxy.py"), str(port), llm], "aiohttp_proxy"))
        targets["aiohttp 1-hop proxy"] = (f"http://127.0.0.1:{port}", {})
        wait_ok(targets["aiohttp 1-hop proxy"][0] + PLAIN[0], PLAIN[1], within=30, proc=procs[-1])

        nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                          else None)
        if nginx is None:
            notes["nginx"] = "nginx not installed (run benchmarks/install.sh)"
        else:
            port = free_port()
            conf = Path(tmp) / "nginx.conf"
            conf.write_text(NGINX_CONF.format(dir=tmp, upstream=llm_port, port=port))
            procs.append(spawn([nginx, "-c", str(conf), "-p", tmp], "nginx"))
            targets["nginx 1-hop"] = (f"http://127.0.0.1:{port}", {})
            try:
                wait_ok(targets["nginx 1-hop"][0] + PLAIN[0], PLAIN[1], within=15, proc=procs[-1])
            except RuntimeError as exc:
                notes["nginx"] = f"nginx did not start: {str(exc)[:100]}"
                del targets["nginx 1-hop"]

        gateway = start_gateway(procs, "proxy-gateway")
        procs.append(spawn([PY, str(APPS / "proxy_worker.py")], "proxy-worker",
                           EASE_AGENT_URL=f"{gateway}/agent/{SID}", PROXY_BASE_URL=llm,
                           EASE_HEARTBEAT_INTERVAL="0.5"))
        targets["spirit gateway+worker"] = (gateway, AUTH)
        wait_ok(gateway + PLAIN[0], PLAIN[1], AUTH, within=60, proc=procs[-1])

        loads = wrk_round_robin({(name, kind): (url + path, body, headers, 32)
                                 for name, (url, headers) in targets.items()
                                 for kind, (path, body) in (("plain", PLAIN),
                                                            ("stream", STREAM))}, runs, dur)
        for (name, kind), load in loads.items():
            rps.setdefault(name, {})[kind] = load.rps
        first = cast(dict[str, float], run_loop(ttfc(
            {name: targets[name] for name in ("direct", "spirit gateway+worker")}, n_ttfc)))

    ours = rps["spirit gateway+worker"]
    out: list[Result] = []
    for kind, label in (("plain", "non-streamed"), ("stream", "streamed")):
        out.append(result(f"proxy {label}", ours[kind], "req/s", "fake LLM direct",
                          rps["direct"][kind], "≥ 0.35×", lambda r: r >= 0.35))
        out.append(result(f"proxy {label}", ours[kind], "req/s", "aiohttp 1-hop proxy",
                          rps["aiohttp 1-hop proxy"][kind], "≥ 1.3×", lambda r: r >= 1.3))
        if "nginx 1-hop" in rps:
            out.append(result(f"proxy {label}", ours[kind], "req/s", "nginx 1-hop",
                              rps["nginx 1-hop"][kind]))
        else:
            out.append(skipped(f"proxy {label} vs nginx", notes.get("nginx", "?"), "req/s",
                               "nginx 1-hop", "report"))
    over = (first["spirit gateway+worker"] - first["direct"]) * 1000
    out.append(result("proxy time-to-first-chunk overhead p50", over, "ms",
                      "direct TTFC p50", first["direct"] * 1000, "< 2 ms",
                      check=lambda _: over < 2.0, ratio=first["spirit gateway+worker"]
                      / first["direct"]))
    return out


if __name__ == "__main__":
    main_for(run, "proxy")
