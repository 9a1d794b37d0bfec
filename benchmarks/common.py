"""Shared helpers of the benchmarks: results, processes, ports, wrk, tables, saved runs.

Every server a benchmark starts listens on 127.0.0.1; every wait is bounded.
A goal is a ``Target``: an operator and a number that the row's ratio (or,
for a row without a baseline, its value) must satisfy; it is kept in the JSON
as ``goal_op``/``goal_value`` so ``plot.py`` can draw every run against it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

K = TypeVar("K")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
APPS = HERE / "apps"
RESULTS = HERE / "results"
PY = sys.executable
LOGS = Path(tempfile.gettempdir()) / "spirit-bench-logs"
INSTALL_HINT = "run benchmarks/install.sh"


class Skip(Exception):
    """A benchmark or baseline cannot run here (reported as 'skipped: <why>')."""


Target = tuple[str, float]  # ("<=", 2.5): the ratio (or value) must be <= 2.5
_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": lambda a, b: a <= b, "<": lambda a, b: a < b,
    ">=": lambda a, b: a >= b, ">": lambda a, b: a > b, "==": lambda a, b: a == b,
}
_SIGNS = {"<=": "≤", "<": "<", ">=": "≥", ">": ">", "==": "="}


@dataclass
class Result:
    name: str
    value: float | None
    unit: str
    baseline: str = ""
    baseline_value: float | None = None
    ratio: float | None = None
    goal: str = "report"
    met: bool | str | None = None  # True/False, None = report only, "skipped: ..." string
    goal_op: str | None = None  # with goal_value: the machine-readable goal
    goal_value: float | None = None
    goal_on: str | None = None  # "ratio" or "value": what the goal is checked on

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def result(name: str, value: float | None, unit: str, baseline: str = "",
           baseline_value: float | None = None, goal: str = "report",
           check: Callable[[float], bool] | None = None,
           ratio: float | None = None, target: Target | None = None) -> Result:
    """A row; ``ratio`` defaults to value / baseline_value.

    ``target`` (preferred) or ``check`` decides 'met' on the ratio, or on the
    value when the row has no ratio.
    """
    if ratio is None and value is not None and baseline_value:
        ratio = value / baseline_value
    met: bool | None = None
    subject = ratio if ratio is not None else value
    op = goal_value = goal_on = None
    if target is not None:
        op, goal_value = target
        # a row that names a baseline is judged on the ratio, never on its bare value
        goal_on = "ratio" if ratio is not None or baseline else "value"
        if goal == "report":
            goal = f"{_SIGNS[op]} {goal_value:g}{'×' if goal_on == 'ratio' else ' ' + unit}".strip()
        if goal_on == "ratio" and ratio is None:
            return Result(name, _round(value), unit, baseline, _round(baseline_value), None, goal,
                          f"skipped: no ratio (baseline value {baseline_value})", op, goal_value,
                          goal_on)
        check = lambda s: _OPS[op](s, goal_value)  # noqa: E731
    if check is not None:
        met = bool(subject is not None and check(subject))
    return Result(name, _round(value), unit, baseline, _round(baseline_value), _round(ratio, 3),
                  goal, met, op, goal_value, goal_on)


def skipped(name: str, why: str, unit: str = "", baseline: str = "", goal: str = "",
            target: Target | None = None) -> Result:
    """A row that could not be measured: it stays in the table and JSON with its reason."""
    if target is not None and not goal:
        goal = f"{_SIGNS[target[0]]} {target[1]:g}{'×' if baseline else ' ' + unit}".strip()
    return Result(name, None, unit, baseline, None, None, goal, f"skipped: {why}",
                  target[0] if target else None, target[1] if target else None)


def _round(x: float | None, digits: int = 4) -> float | None:
    if x is None:
        return None
    return float(f"{x:.{digits}g}") if abs(x) < 1e4 else round(x, 1)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(),
        "cpus": os.cpu_count(), "processor": platform.processor(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["processor"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_mib"] = int(line.split()[1]) // 1024
    wrk = shutil.which("wrk")
    info["wrk"] = wrk or "missing"
    info["hostname"] = platform.node()
    venv = Path(os.environ.get("LITELLM_VENV", HERE / ".venv-litellm"))
    dists = sorted(venv.glob("lib/python*/site-packages/litellm-*.dist-info"))
    info["litellm"] = dists[-1].name[len("litellm-"):-len(".dist-info")] if dists else "missing"
    nginx = shutil.which("nginx") or Path("/usr/sbin/nginx").exists()
    info["nginx"] = "yes" if nginx else "missing"
    return info


def git_commit() -> tuple[str, bool]:
    """(commit hash or "unknown", whether the tree has uncommitted changes)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "spirit_gpu",
                                     "benchmarks"], cwd=ROOT, capture_output=True, text=True,
                                    timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", False
    return head or "unknown", dirty


# ---- processes -----------------------------------------------------------------------

def env_with(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.setdefault("EASE_LOG_LEVEL", "WARNING")
    env.update(extra)
    return env


def spawn(cmd: list[str], name: str, **extra: str) -> subprocess.Popen[bytes]:
    """Start a server process in its own session, output to a log file under LOGS."""
    LOGS.mkdir(parents=True, exist_ok=True)
    log = open(LOGS / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(cmd, env=env_with(**extra), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(ROOT))
    proc.log = log  # type: ignore[attr-defined]
    proc.name = name  # type: ignore[attr-defined]
    return proc


def log_tail(proc: subprocess.Popen[bytes], n: int = 1500) -> str:
    with contextlib.suppress(OSError):
        return (LOGS / f"{proc.name}.log").read_text(errors="replace")[-n:]  # type: ignore
    return ""


def stop(proc: subprocess.Popen[bytes] | None, grace: float = 5.0) -> None:
    """SIGTERM the process group we started, SIGKILL after ``grace`` seconds."""
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # children left in the group
    with contextlib.suppress(Exception):
        proc.log.close()  # type: ignore[attr-defined]


@contextlib.contextmanager
def servers() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for p in reversed(procs):
            stop(p)


def post(url: str, body: bytes, headers: dict[str, str] | None = None,
         timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_ok(url: str, body: bytes, headers: dict[str, str] | None = None, within: float = 30.0,
            proc: subprocess.Popen[bytes] | None = None, method: str = "POST") -> None:
    """Poll until ``url`` answers 200; raise with the server's log when it never does."""
    end = time.monotonic() + within
    last = ""
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited {proc.returncode}: {log_tail(proc)}")
        try:
            if method == "GET":
                with urllib.request.urlopen(url, timeout=2) as r:
                    status = r.status
            else:
                status, data = post(url, body, headers, timeout=2)
                last = data[:200].decode(errors="replace")
            if status == 200:
                return
            last = f"{status} {last}"
        except (OSError, urllib.error.URLError) as exc:
            last = repr(exc)
        time.sleep(0.05)
    tail = log_tail(proc) if proc is not None else ""
    raise RuntimeError(f"{url} not ready within {within:g} s (last: {last}) {tail}")


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants (from /proc)."""
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(x) for x in (task / "children").read_text().split()]
    return total


# ---- wrk ---------------------------------------------------------------------------

_LUA = """wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
{headers}
"""
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _lua_string(data: bytes) -> str:
    return "'" + data.decode().replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass
class Load:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def wrk(url: str, body: bytes, headers: dict[str, str] | None = None, conns: int = 32,
        duration: float = 3.0) -> Load:
    """One wrk run (one thread), POSTing ``body``; requests/s and latency percentiles."""
    exe = shutil.which("wrk")
    if exe is None:
        raise Skip(f"wrk not installed ({INSTALL_HINT})")
    hdrs = "\n".join(f"wrk.headers[{_lua_string(k.encode())}] = {_lua_string(v.encode())}"
                     for k, v in (headers or {}).items())
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(_LUA.format(body=_lua_string(body), headers=hdrs))
        script = f.name
    try:
        out = subprocess.run([exe, "-t1", f"-c{conns}", f"-d{max(1, round(duration))}s",
                              "--timeout", "10s", "--latency", "-s", script, url],
                             capture_output=True, text=True, timeout=duration + 30).stdout
    finally:
        os.unlink(script)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s|m)\b", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s|m)\b", out)
    if not (rps and p50 and p99):
        raise RuntimeError(f"could not read wrk output: {out[-800:]}")
    errors = 0
    for pat in (r"Non-2xx or 3xx responses:\s+(\d+)", r"Socket errors:.*?timeout (\d+)"):
        m = re.search(pat, out)
        if m:
            errors += int(m.group(1))
    return Load(float(rps.group(1)), float(p50.group(1)) * _UNITS[p50.group(2)],
                float(p99.group(1)) * _UNITS[p99.group(2)], errors)


def wrk_median(url: str, body: bytes, headers: dict[str, str] | None = None, conns: int = 32,
               duration: float = 3.0, runs: int = 3) -> Load:
    return median_load([wrk(url, body, headers, conns, duration) for _ in range(runs)])


def wrk_rounds(loads: dict[K, tuple[str, bytes, dict[str, str] | None, int]],
               runs: int, duration: float) -> dict[K, list[Load]]:
    """Every round's ``Load`` of each ``(url, body, headers, conns)``.

    Round 1 runs every load once, then round 2, ...: a machine whose speed
    drifts (a shared VM) moves ours and the baselines alike, and figures of
    the same round can be compared with each other.
    """
    samples: dict[K, list[Load]] = {key: [] for key in loads}
    for _ in range(runs):
        for key, (url, body, headers, conns) in loads.items():
            samples[key].append(wrk(url, body, headers, conns, duration))
    return samples


def wrk_rounds_cpu(loads: dict[K, tuple[str, bytes, dict[str, str] | None, int]],
                   pids: dict[K, list[int]], runs: int, duration: float,
                   durations: dict[K, float] | None = None
                   ) -> tuple[dict[K, list[Load]], dict[K, float]]:
    """``wrk_rounds``, plus the CPU µs per request of each load's own processes.

    ``pids[key]``: the processes (with their descendants) that serve that load
    alone; their CPU time is read from /proc around each of its runs. CPU per
    request moves far less than requests/s with load from elsewhere on a
    shared machine. ``durations`` overrides ``duration`` per key.
    """
    samples: dict[K, list[Load]] = {key: [] for key in loads}
    used: dict[K, float] = {key: 0.0 for key in loads}
    for _ in range(runs):
        for key, (url, body, headers, conns) in loads.items():
            mine = pids.get(key, [])
            before = sum(tree_cpu_seconds(pid) for pid in mine)
            dur = (durations or {}).get(key, duration)
            samples[key].append(wrk(url, body, headers, conns, dur))
            used[key] += sum(tree_cpu_seconds(pid) for pid in mine) - before
    cpu_us: dict[K, float] = {}
    for key in loads:
        served = sum(x.rps for x in samples[key]) * (durations or {}).get(key, duration)
        if pids.get(key) and served:
            cpu_us[key] = used[key] / served * 1e6
    return samples, cpu_us


def wrk_round_robin(loads: dict[K, tuple[str, bytes, dict[str, str] | None, int]],
                    runs: int, duration: float) -> dict[K, Load]:
    """The median ``Load`` of each ``(url, body, headers, conns)`` over ``wrk_rounds``."""
    return {key: median_load(values) for key, values in wrk_rounds(loads, runs, duration).items()}


def median_load(loads: list[Load]) -> Load:
    """Medians of several runs' figures (errors summed)."""
    return Load(median([x.rps for x in loads]), median([x.p50_ms for x in loads]),
                median([x.p99_ms for x in loads]), sum(x.errors for x in loads))


# ---- output ------------------------------------------------------------------------

def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def table(results: list[Result], title: str = "spirit-gpu benchmarks") -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for col in ("name", "value", "baseline", "baseline value", "ratio", "goal", "met"):
        t.add_column(col, justify="right" if col in ("value", "baseline value", "ratio")
                     else "left")
    for r in results:
        if isinstance(r.met, str):
            met = f"[yellow]{r.met}[/]"
        elif r.met is None:
            met = "report"
        else:
            met = "[green]yes[/]" if r.met else "[red]NO[/]"
        t.add_row(r.name, f"{fmt(r.value)} {r.unit}".strip(), r.baseline, fmt(r.baseline_value),
                  "-" if r.ratio is None else f"{r.ratio:.2f}×", r.goal, met)
    Console(width=200).print(t)


def run_record(results: list[Result], mode: str = "", seconds: float | None = None
               ) -> dict[str, Any]:
    """What a saved run holds: the machine, the commit, the date and every row."""
    commit, dirty = git_commit()
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "commit": commit, "dirty": dirty, "mode": mode, "seconds": seconds,
            "machine": machine(), "results": [r.to_json() for r in results]}


def write_json(path: str | Path, results: list[Result], mode: str = "",
               seconds: float | None = None) -> dict[str, Any]:
    record = run_record(results, mode, seconds)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return record


def save_run(results: list[Result], mode: str, seconds: float | None = None) -> Path:
    """Write the run under benchmarks/results/ as <UTC date and time>-<commit>-<mode>.json."""
    commit, dirty = git_commit()
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H%M%SZ")
    path = RESULTS / f"{stamp}-{commit[:10]}{'-dirty' if dirty else ''}-{mode}.json"
    write_json(path, results, mode, seconds)
    return path


def main_for(run: Callable[[bool], list[Result]], title: str) -> None:
    """``python benchmarks/X.py [--quick] [--json PATH]`` for one benchmark."""
    import argparse

    ap = argparse.ArgumentParser(description=title)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ns = ap.parse_args()
    results = run(ns.quick)
    table(results, title)
    if ns.json:
        write_json(ns.json, results, "quick" if ns.quick else "full")
