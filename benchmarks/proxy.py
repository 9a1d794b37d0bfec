"""proxy: gateway -> proxy worker -> fake LLM server (tests/proxy/fake_llm.py).

OpenAI chat completions, non-streamed and streamed (SSE, 5 chunks, no delay):
requests/s with wrk at concurrency 32, and time-to-first-chunk (aiohttp
client, one in flight, 3 chunks 5 ms apart). Baselines in the same run: the
fake LLM server called directly; nginx as one reverse-proxy hop in front of
it (upstream keep-alive, no buffering); a plain single-hop aiohttp reverse
proxy (apps/aiohttp_proxy.py); and, as the peer people put in front of
vLLM/ollama for keys and routing, LiteLLM's proxy (litellm_peer.py: its own
venv, master key, nothing external).

Each target's processes' CPU time per request (from /proc, over its own wrk
runs) is reported next to the rates: it moves far less with load from
elsewhere on a shared machine than requests/s do.

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

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp  # noqa: E402
import litellm_peer  # noqa: E402
from common import (  # noqa: E402
    APPS,
    PY,
    Result,
    free_port,
    main_for,
    median,
    median_load,
    result,
    servers,
    skipped,
    spawn,
    wait_ok,
    wrk_rounds_cpu,
)
from e2e_sync import KEY, start_gateway  # noqa: E402

from spirit_gpu.loop import run as run_loop  # noqa: E402

SID = "bench"
AUTH = {"Auth": f"{SID}-{KEY}"}
MESSAGES = [{"role": "user", "content": "hi"}]
PLAIN = ("/v1/chat/completions", json.dumps({"model": "m", "messages": MESSAGES,
                                             "stream": False}).encode())
STREAM = ("/v1/chat/completions", json.dumps({"model": "m", "messages": MESSAGES,
                                              "stream": True, "chunks": 5, "delay": 0}).encode())
TTFC = ("/v1/chat/completions", json.dumps({"model": "m", "messages": MESSAGES, "stream": True,
                                            "chunks": 3, "delay": 0.005}).encode())
OURS = "spirit gateway+worker"
LITELLM = "LiteLLM proxy"

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
    pids: dict[str, list[int]] = {}  # the processes that serve each target
    cpu_us: dict[str, dict[str, float]] = {}  # CPU µs per request, per target and kind
    with servers() as procs, tempfile.TemporaryDirectory() as tmp:
        llm_port = free_port()
        procs.append(spawn([PY, str(APPS / "fake_llm_server.py"), str(llm_port)], "fake_llm"))
        llm = f"http://127.0.0.1:{llm_port}"
        wait_ok(llm + PLAIN[0], PLAIN[1], within=30, proc=procs[-1])
        targets: dict[str, tuple[str, dict[str, str]]] = {"direct": (llm, {})}

        port = free_port()
        procs.append(spawn([PY, str(APPS / "aiohttp_proxy.py"), str(port), llm], "aiohttp_proxy"))
        pids["aiohttp 1-hop proxy"] = [procs[-1].pid]
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
            pids["nginx 1-hop"] = [procs[-1].pid]
            targets["nginx 1-hop"] = (f"http://127.0.0.1:{port}", {})
            try:
                wait_ok(targets["nginx 1-hop"][0] + PLAIN[0], PLAIN[1], within=15, proc=procs[-1])
            except RuntimeError as exc:
                notes["nginx"] = f"nginx did not start: {str(exc)[:100]}"
                del targets["nginx 1-hop"]

        notes["litellm"] = litellm_peer.available()
        if not notes["litellm"]:
            try:
                targets[LITELLM] = litellm_peer.start(procs, llm, tmp)
                pids[LITELLM] = [procs[-1].pid]
            except RuntimeError as exc:
                notes["litellm"] = f"LiteLLM did not start: {str(exc)[:120]}"

        gateway = start_gateway(procs, "proxy-gateway")
        gateway_proc = procs[-1]
        procs.append(spawn([PY, str(APPS / "proxy_worker.py")], "proxy-worker",
                           EASE_AGENT_URL=f"{gateway}/agent/{SID}", PROXY_BASE_URL=llm,
                           EASE_HEARTBEAT_INTERVAL="0.5"))
        targets[OURS] = (gateway, AUTH)
        wait_ok(gateway + PLAIN[0], PLAIN[1], AUTH, within=60, proc=procs[-1])

        pids[OURS] = [gateway_proc.pid, procs[-1].pid]
        kinds = (("plain", PLAIN), ("stream", STREAM))
        keys = [(name, kind) for name in targets for kind, _ in kinds]
        # LiteLLM takes seconds per request at c=32 here: it gets a longer window
        samples, cpu = wrk_rounds_cpu(
            {(name, kind): (targets[name][0] + path, body, targets[name][1], 32)
             for name in targets for kind, (path, body) in kinds},
            {key: pids[key[0]] for key in keys if key[0] in pids}, runs, dur,
            {key: dur * 3 for key in keys if key[0] == LITELLM})
        errors = {name: 0 for name in targets}
        for (name, kind), runs_ in samples.items():
            load = median_load(runs_)
            rps.setdefault(name, {})[kind] = load.rps
            errors[name] += load.errors
        for (name, kind), us in cpu.items():
            cpu_us.setdefault(name, {})[kind] = us
        first = run_loop(ttfc(
            {name: targets[name] for name in ("direct", OURS, LITELLM) if name in targets},
            n_ttfc))

    ours = rps[OURS]
    out: list[Result] = []
    for kind, label in (("plain", "non-streamed"), ("stream", "streamed")):
        out.append(result(f"proxy {label}", ours[kind], "req/s", "fake LLM direct",
                          rps["direct"][kind]))
        out.append(result(f"proxy {label}", ours[kind], "req/s", "aiohttp 1-hop proxy",
                          rps["aiohttp 1-hop proxy"][kind], target=(">=", 1.3)))
        nginx_target = (">=", 1.0) if kind == "stream" else None
        if "nginx 1-hop" in rps:
            out.append(result(f"proxy {label}", ours[kind], "req/s", "nginx 1-hop",
                              rps["nginx 1-hop"][kind], target=nginx_target))
        else:
            out.append(skipped(f"proxy {label}", notes.get("nginx", "?"), "req/s",
                               "nginx 1-hop", "report" if nginx_target is None else "",
                               nginx_target))
        if LITELLM in rps and rps[LITELLM][kind] > 0:
            out.append(result(f"proxy {label}", ours[kind], "req/s", LITELLM,
                              rps[LITELLM][kind], target=(">=", 20.0),
                              goal=f"≥ 20× (LiteLLM errors {errors[LITELLM]})"))
        elif LITELLM in rps:
            out.append(skipped(f"proxy {label}", f"LiteLLM finished no request in its runs "
                               f"({errors[LITELLM]} errors or timeouts)", "req/s", LITELLM,
                               target=(">=", 20.0)))
        else:
            out.append(skipped(f"proxy {label}", notes["litellm"], "req/s", LITELLM,
                               target=(">=", 20.0)))
    for kind, label in (("plain", "non-streamed"), ("stream", "streamed")):
        mine = cpu_us.get(OURS, {}).get(kind)
        for peer in ("aiohttp 1-hop proxy", "nginx 1-hop", LITELLM):
            theirs = cpu_us.get(peer, {}).get(kind)
            if mine is not None and theirs is not None:
                out.append(result(f"proxy {label}: CPU per request (gateway + worker)", mine,
                                  "µs", f"{peer} CPU per request", theirs))
    over = (first[OURS] - first["direct"]) * 1000
    out.append(result("proxy time-to-first-chunk overhead p50", over, "ms",
                      "direct TTFC p50", first["direct"] * 1000,
                      ratio=first[OURS] / first["direct"], goal="report"))
    if LITELLM in first:
        theirs = (first[LITELLM] - first["direct"]) * 1000
        out.append(result("proxy time-to-first-chunk overhead p50", over, "ms",
                          LITELLM + " overhead", theirs, target=("<=", 0.2)))
    else:
        out.append(skipped("proxy time-to-first-chunk overhead p50", notes["litellm"], "ms",
                           LITELLM + " overhead", target=("<=", 0.2)))
    failed = sum(n for name, n in errors.items() if name == OURS)
    out.append(result("proxy failed responses (ours)", failed, "", target=("==", 0)))
    return out


if __name__ == "__main__":
    main_for(run, "proxy")
