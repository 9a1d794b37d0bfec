"""One chaos run: steady sync, async and streaming traffic against a gateway and
two workers (one on the plain protocol, one on the link) while handler
processes, supervisors and the gateway are SIGKILLed and webhooks fail; then
how every request ended, which webhooks arrived, and which processes are left.

Everything is real: the gateway and the supervisors are subprocesses
(``spirit-gpu gateway``, ``python -m spirit_gpu.supervisor``), the handler
processes are theirs, the clients and the webhook receiver are aiohttp on
127.0.0.1. The run itself asserts nothing; it returns a ``Report`` that the
tests (tests/chaos/test_chaos.py) and ``scripts/chaos.sh`` judge.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import re
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.chaos import procs
from tests.chaos.receiver import MODES, Receiver
from tests.chaos.stores import Store
from tests.conftest import free_port, until

SID = "chaos"
STREAM_RETRIES = 20  # reads of one stream across gateway restarts
KEY = "chaos-key"
TOKEN = "chaos-token"
AUTH = {"Authorization": f"Bearer {KEY}"}
APP = Path(__file__).resolve().parent / "apps" / "chaos_worker.py"
TERMINAL = ("succeed", "failed", "cancelled")
TRANSPORTS = ("plain", "link")
# how often each webhook behaviour is picked (receiver.py)
MODE_WEIGHTS = {"ok": 0.5, "flaky": 0.15, "fail": 0.1, "hang": 0.05, "refused": 0.2}
HELPER_SECONDS = "3600"  # the handler's helper process lives this long unless killed
assert set(MODE_WEIGHTS) == set(MODES)


@dataclass(frozen=True)
class Settings:
    seconds: float  # how long the traffic and the kills go on
    seed: int
    async_per_s: float = 4.0
    streams_per_s: float = 1.0
    sync_clients: int = 2
    child_kill_gap: tuple[float, float] = (0.3, 1.5)  # seconds between handler kills
    supervisor_kills: int = 2
    gateway_kills: int = 1
    ttl_ms: int = 10_000  # async requests' policy.ttl: a queued request ends in time
    lease_s: float = 2.0
    sync_timeout_s: float = 20.0

    @classmethod
    def lasting(cls, seconds: float, seed: int) -> Settings:
        """A supervisor kill every 15 s and a gateway kill every 45 s (at least 2 and 1)."""
        return cls(seconds, seed, supervisor_kills=max(2, round(seconds / 15)),
                   gateway_kills=max(1, round(seconds / 45)))


@dataclass
class Sent:
    """One client request and everything the client saw of it."""

    kind: str  # sync | async | stream
    tag: str
    n: int  # items the handler yields
    mode: str  # the webhook's behaviour ("" for sync requests)
    epoch_sent: int  # which gateway (0, 1, ...) was up when it was sent
    epoch_answered: int = -1  # ... and when its answer (or error) came
    http: int = 0  # the answer's status; 0: none
    error: str = ""
    rid: str = ""
    body: Any = None
    stream_http: int = 0
    chunks: list[tuple[int, Any]] = field(default_factory=list)
    end: dict[str, Any] | None = None
    stream_error: str = ""
    first_terminal: dict[str, Any] | None = None  # the first terminal status read
    final: dict[str, Any] | None = None  # the status read at the very end

    @property
    def refused(self) -> bool:
        """Turned away at the door: no worker connected (the reference's 503)."""
        return self.http == 503 and "not enough gpu" in str(self.body)

    @property
    def accepted(self) -> bool:
        if self.kind == "sync":
            return self.http != 0 and not self.refused
        return self.http == 200 and bool(self.rid)


@dataclass
class Report:
    settings: Settings
    store: str
    run_id: str
    epochs: int = 1
    sent: list[Sent] = field(default_factory=list)
    counted: list[Sent] = field(default_factory=list)  # accepted by a gateway whose state lives
    kills: Counter[str] = field(default_factory=Counter)
    webhook_attempts: Counter[str] = field(default_factory=Counter)
    webhook_duplicates: dict[str, int] = field(default_factory=dict)
    webhook_deliveries: dict[str, list[int]] = field(default_factory=dict)  # rid -> codes
    processes_left: list[str] = field(default_factory=list)  # supervisors, handlers, gateways
    helpers_left_after_handler_exit: list[str] = field(default_factory=list)
    helpers_left_after_supervisor_kill: list[str] = field(default_factory=list)
    stop_codes: dict[str, int] = field(default_factory=dict)
    problems: dict[str, list[str]] = field(default_factory=dict)
    seconds_total: float = 0.0

    def problem(self, kind: str, what: str) -> None:
        self.problems.setdefault(kind, []).append(what)

    def terminal_by_status(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for s in self.counted:
            if s.kind == "sync":
                out[f"sync {s.http}"] += 1
            else:
                view = s.final or {}
                out[f"{s.kind} {view.get('status', 'none')} {view.get('statusCode', '-')}"] += 1
        return out

    def failure_reasons(self) -> Counter[str]:
        """Why counted requests failed, numbers blanked (pids, seconds) so alike ones count
        together."""
        out: Counter[str] = Counter()
        for x in self.counted:
            if x.kind == "sync":
                if x.http == 200:
                    continue
                why = str(x.body.get("error", x.body)) if isinstance(x.body, dict) else str(
                    x.body)
            else:
                view = x.final or {}
                if view.get("status") == "succeed":
                    continue
                why = str(view.get("message", ""))
            out[re.sub(r"\d+(\.\d+)?", "N", why)[:70]] += 1
        return out

    def summary(self) -> str:
        s = self.settings
        by_kind = Counter(x.kind for x in self.sent)
        accepted = Counter(x.kind for x in self.sent if x.accepted)
        counted = Counter(x.kind for x in self.counted)
        refused = sum(1 for x in self.sent if x.refused)
        unanswered = sum(1 for x in self.sent if x.http == 0)
        lost_by_design = sum(accepted.values()) - sum(counted.values())
        lost = len(self.problems.get("not terminal", []))
        lines = [
            f"chaos run {self.run_id}: seed {s.seed}, store {self.store}, {s.seconds:g} s of "
            f"traffic, {self.seconds_total:.1f} s in all, {self.epochs} gateway epoch(s)",
            "sent      " + _counts(by_kind),
            "accepted  " + _counts(accepted) + f" (refused 503 no worker: {refused}, no answer "
            f"(gateway killed): {unanswered})",
            "counted   " + _counts(counted) + f" (accepted by a gateway later killed, lost by "
            f"design with the {self.store} store: {lost_by_design})",
            "terminal  " + _counts(self.terminal_by_status()),
            "failed    " + _counts(self.failure_reasons()),
            f"lost      {lost} (accepted, counted, no terminal status)",
            "kills     " + _counts(self.kills),
            "webhooks  attempts by mode " + _counts(self.webhook_attempts)
            + f"; delivered (200) for {len(self.webhook_deliveries)} request(s); duplicated "
            f"{len(self.webhook_duplicates)}",
            f"processes left: {len(self.processes_left)}; helpers (grandchildren) left after "
            f"their handler process ended: {len(self.helpers_left_after_handler_exit)}, after "
            f"a supervisor SIGKILL: {len(self.helpers_left_after_supervisor_kill)}",
        ]
        for kind, items in sorted(self.problems.items()):
            lines.append(f"PROBLEM {kind}: {len(items)}: " + "; ".join(items[:5]))
        return "\n".join(lines)


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counter.items())) or "-"


@dataclass
class _Supervisor:
    transport: str
    proc: procs.Spawned


class Chaos:
    def __init__(self, settings: Settings, store: Store, workdir: Path,
                 say: Callable[[str], None] = print) -> None:
        self.s = settings
        self.store = store
        self.rng = random.Random(settings.seed)
        self.work = workdir
        self.say = say
        self.run_id = f"{settings.seed}-{os.getpid()}-{time.time_ns() % 10**9}"
        self.busy = workdir / "busy"
        self.busy.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.report = Report(settings, store.name, self.run_id)
        self.epoch = 0
        self.gateway_killed = 0  # gateway kills begun (the epoch moves after the reap)
        self.ever_busy: set[int] = set()  # handler processes seen running a job
        self.gateway: procs.Spawned | None = None
        self.gateway_flags: list[str] = []
        self.supervisors: list[_Supervisor] = []
        self.children: dict[int, procs.ProcInfo] = {}  # pid -> handler process seen
        self.known: dict[tuple[int, int], str] = {}  # (pid, start) -> role
        self.supervisor_killed_children: set[int] = set()  # their pids are their helpers' pgids
        self.receiver = Receiver()
        self.stopping = asyncio.Event()
        self.tasks: set[asyncio.Task[Any]] = set()
        self._logs = 0
        self._turn = self.rng.randrange(len(TRANSPORTS))  # whose supervisor dies next
        self._modes_dealt = 0

    # ---- processes ----------------------------------------------------------------------

    def _env(self, **extra: str) -> dict[str, str]:
        return dict(os.environ, PYTHONUNBUFFERED="1", **{procs.RUN_VAR: self.run_id}, **extra)

    def _log(self, name: str) -> Path:
        self._logs += 1
        return self.work / f"{self._logs:03d}-{name}.log"

    async def _start_gateway(self) -> None:
        argv = [procs.PYTHON, "-m", "spirit_gpu.cli", "gateway", "--port", str(self.port),
                "--api-key", KEY, "--worker-token", TOKEN,
                "--lease-seconds", str(self.s.lease_s), "--sweep-interval", "0.2",
                "--sync-timeout", str(self.s.sync_timeout_s), *self.gateway_flags]
        gw = procs.Spawned("gateway", argv, self._env(), self._log(f"gateway{self.epoch}"))
        self.gateway = gw
        self.known[(gw.pid, gw.start)] = f"gateway (epoch {self.epoch})"

        async def healthy() -> bool:
            assert gw.running(), f"the gateway exited: {gw.tail()}"
            try:
                async with self.session.get(f"{self.base}/healthz",
                                            timeout=aiohttp.ClientTimeout(total=2)) as r:
                    return r.status == 200
            except (aiohttp.ClientError, TimeoutError):
                return False
        await until(healthy, 30, "the gateway answers /healthz", detail=gw.tail)

    def _start_supervisor(self, transport: str) -> _Supervisor:
        env = self._env(
            EASE_AGENT_URL=f"{self.base}/agent/{SID}", SPIRIT_WORKER_TOKEN=TOKEN,
            SPIRIT_TRANSPORT="plain" if transport == "plain" else "auto",
            EASE_HEARTBEAT_INTERVAL="0.5", SPIRIT_PULL_BACKOFF_MAX="0.2",
            SPIRIT_MAX_CHILDREN="2", SPIRIT_MIN_CHILDREN="2", CHAOS_CONCURRENCY="2",
            SPIRIT_CRASH_BACKOFF_MAX="1",
            # a webhook call outlasts the gateway relay's retry of a 5xx (0.5 s): a worker
            # that gives up sooner calls the relay twice (test_found.py)
            SPIRIT_WEBHOOK_ATTEMPTS="2", SPIRIT_WEBHOOK_BACKOFF="0.2",
            SPIRIT_WEBHOOK_TIMEOUT="2", SPIRIT_GRACE_PERIOD="5",
            CHAOS_BUSY_DIR=str(self.busy), CHAOS_HELPER_SECONDS=HELPER_SECONDS)
        proc = procs.Spawned(f"supervisor-{transport}",
                             [procs.PYTHON, "-m", "spirit_gpu.supervisor", str(APP)], env,
                             self._log(f"supervisor-{transport}"))
        self.known[(proc.pid, proc.start)] = f"supervisor ({transport})"
        sup = _Supervisor(transport, proc)
        self.supervisors.append(sup)
        return sup

    def _scan_children(self) -> list[tuple[_Supervisor, procs.ProcInfo]]:
        """The live handler processes of the live supervisors (and remember them)."""
        by_parent: dict[int, list[procs.ProcInfo]] = {}
        for pid in procs.all_pids():
            pi = procs.info(pid)
            if pi is not None and pi.running:
                by_parent.setdefault(pi.ppid, []).append(pi)
        found = []
        for sup in self.supervisors:
            if not sup.proc.running():
                continue
            for pi in by_parent.get(sup.proc.pid, []):
                found.append((sup, pi))
                self.children[pi.pid] = pi
                self.known.setdefault((pi.pid, pi.start), f"handler process ({sup.transport})")
        return found

    async def _watch(self) -> None:
        while not self.stopping.is_set():
            self._scan_children()
            await asyncio.sleep(0.25)

    # ---- chaos --------------------------------------------------------------------------

    async def _kill_children(self) -> None:
        lo, hi = self.s.child_kill_gap
        while not self.stopping.is_set():
            await asyncio.sleep(self.rng.uniform(lo, hi))
            found = self._scan_children()
            if not found:
                continue
            busy = {int(n) for n in os.listdir(self.busy) if n.isdigit()}
            self.ever_busy |= busy
            working = [(s, pi) for s, pi in found if pi.pid in busy]
            # only processes that have run a job: one killed while its supervisor's very
            # first process is still starting makes that supervisor give up (exit 3, as
            # for a script that cannot import), which is not what this run is about
            served = [(s, pi) for s, pi in found if pi.pid in self.ever_busy]
            if not served:
                continue
            pool = working if working and self.rng.random() < 0.7 else served
            _, victim = self.rng.choice(pool)
            if procs.kill(victim.pid, victim.start):
                self.report.kills["handler processes"] += 1
                if victim.pid in busy:
                    self.report.kills["handler processes mid-job"] += 1

    async def _kill_supervisor(self) -> None:
        live = [s for s in self.supervisors if s.proc.running()]
        if not live:
            return
        # the transports take turns, from a random first one
        self._turn += 1
        wanted = TRANSPORTS[self._turn % len(TRANSPORTS)]
        sup = next((s for s in live if s.transport == wanted), live[0])
        for other, pi in self._scan_children():
            if other is sup:
                self.supervisor_killed_children.add(pi.pid)
        sup.proc.signal(signal.SIGKILL)
        self.report.kills[f"supervisors ({sup.transport})"] += 1
        await until(lambda: not sup.proc.running(), 15, "the killed supervisor is reaped")
        sup.proc.reap()
        self._start_supervisor(sup.transport)

    async def _kill_gateway(self) -> None:
        gw = self.gateway
        assert gw is not None
        self.gateway_killed += 1  # before the signal: a stream it cuts sees this already
        gw.signal(signal.SIGKILL)
        self.report.kills["gateways"] += 1
        await until(lambda: not gw.running(), 15, "the killed gateway is reaped")
        gw.reap()
        self.epoch += 1  # from here on, any answer comes from the next gateway
        await self._start_gateway()

    async def _schedule_kills(self, t0: float) -> None:
        s = self.s
        plan = [(self.rng.uniform(0.15, 0.85) * s.seconds, "supervisor")
                for _ in range(s.supervisor_kills)]
        # gateways die in the first 60 %: the last gateway sees a good share of the traffic
        plan += [(self.rng.uniform(0.1, 0.6) * s.seconds, "gateway")
                 for _ in range(s.gateway_kills)]
        for at, what in sorted(plan):
            delay = t0 + at - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), delay)
            if self.stopping.is_set():
                return
            await (self._kill_gateway() if what == "gateway" else self._kill_supervisor())

    # ---- traffic ------------------------------------------------------------------------

    def _mode(self) -> str:
        """The first requests try every behaviour once; later ones draw by weight."""
        self._modes_dealt += 1
        if self._modes_dealt <= len(MODES):
            return MODES[self._modes_dealt - 1]
        return self.rng.choices(list(MODE_WEIGHTS), weights=list(MODE_WEIGHTS.values()))[0]

    def _new(self, kind: str) -> Sent:
        n = self.rng.randint(4, 8) if kind == "stream" else self.rng.randint(1, 3)
        sent = Sent(kind, f"{kind[:2]}{len(self.report.sent)}", n,
                    "" if kind == "sync" else self._mode(), self.epoch)
        self.report.sent.append(sent)
        return sent

    def _input(self, sent: Sent) -> dict[str, Any]:
        sleep = 0.1 if sent.kind == "stream" else round(self.rng.uniform(0.01, 0.15), 3)
        return {"tag": sent.tag, "n": sent.n, "sleep": sleep}

    async def _post(self, sent: Sent, path: str, body: dict[str, Any], timeout: float) -> None:
        try:
            async with self.session.post(f"{self.base}{path}", json=body, headers=AUTH,
                                         timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                raw = await r.read()
                sent.http = r.status
                sent.epoch_answered = self.epoch
                try:
                    sent.body = json.loads(raw) if raw else None
                except ValueError:
                    sent.body = raw
        except (aiohttp.ClientError, TimeoutError) as exc:
            sent.epoch_answered = self.epoch
            sent.error = f"{type(exc).__name__}: {exc}"

    async def _send_async(self, kind: str) -> None:
        sent = self._new(kind)
        body = {"input": self._input(sent), "webhook": self.receiver.webhook(sent.mode),
                "policy": {"ttl": self.s.ttl_ms}}
        await self._post(sent, f"/v1/{SID}/async", body, 15)
        if sent.http == 200 and isinstance(sent.body, dict):
            sent.rid = str(sent.body.get("id", ""))
        if kind == "stream" and sent.rid:
            await self._read_stream(sent)

    async def _read_stream(self, sent: Sent) -> None:
        """Read a request's stream as an SSE client would: when the gateway serving it
        dies, read it again (from the start) from the next gateway. With a durable
        store that one has every chunk; with the memory store the request is not
        counted (its gateway is gone)."""
        for _ in range(STREAM_RETRIES):
            killed = self.gateway_killed
            sent.chunks, sent.end, sent.stream_error = [], None, ""
            await self._read_stream_once(sent)
            if sent.end is not None or not sent.stream_error:
                return
            # cut by its gateway's death, or no gateway listening yet: read it again;
            # a stream cut while its gateway lives stays a problem
            if self.gateway_killed == killed and \
                    not sent.stream_error.startswith("ClientConnectorError"):
                return
            await asyncio.sleep(0.5)  # the next gateway is starting: a client's backoff

    async def _read_stream_once(self, sent: Sent) -> None:
        try:
            async with self.session.get(
                    f"{self.base}/v1/{SID}/stream", params={"requestID": sent.rid},
                    headers=AUTH, timeout=aiohttp.ClientTimeout(total=90)) as r:
                sent.stream_http = r.status
                if r.status != 200:
                    return
                event: dict[str, str] = {}
                data: list[bytes] = []
                async for raw in r.content:
                    line = raw.rstrip(b"\r\n")
                    if line:
                        name, _, value = line.partition(b":")
                        value = value[1:] if value.startswith(b" ") else value
                        if name == b"data":
                            data.append(value)
                        else:
                            event[name.decode()] = value.decode()
                        continue
                    if data:
                        payload = json.loads(b"\n".join(data))
                        if event.get("event") == "end":
                            sent.end = payload
                        else:
                            sent.chunks.append((int(event.get("id", "-1")), payload))
                    event, data = {}, []
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            sent.stream_error = f"{type(exc).__name__}: {exc}"

    async def _sync_client(self) -> None:
        while not self.stopping.is_set():
            sent = self._new("sync")
            await self._post(sent, f"/v1/{SID}/sync", {"input": self._input(sent)},
                             self.s.sync_timeout_s + 15)
            pause = self.rng.uniform(0.0, 0.2) + (0.2 if sent.http in (0, 503) else 0.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), pause)

    async def _arrivals(self, kind: str, per_s: float) -> None:
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.rng.expovariate(per_s))
            if not self.stopping.is_set():
                self._spawn(self._send_async(kind))

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # ---- the end ------------------------------------------------------------------------

    def _counts(self, sent: Sent) -> bool:
        if not sent.accepted:
            return False
        if self.store.durable:
            return True
        return sent.epoch_sent == sent.epoch_answered == self.epoch

    async def _status(self, rid: str) -> dict[str, Any] | None:
        try:
            async with self.session.get(f"{self.base}/v1/{SID}/status",
                                        params={"requestID": rid}, headers=AUTH,
                                        timeout=aiohttp.ClientTimeout(total=10)) as r:
                body = await r.json()
                return dict(body) if r.status == 200 else {"status": "notFound",
                                                           "statusCode": r.status, **body}
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    async def _statuses(self, rids: list[str]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for i in range(0, len(rids), 500):
            async with self.session.post(f"{self.base}/v1/{SID}/status", headers=AUTH,
                                         json={"requestIDs": rids[i:i + 500]},
                                         timeout=aiohttp.ClientTimeout(total=20)) as r:
                body = await r.json()
                for view in body["statuses"]:
                    out[view["requestID"]] = view
        return out

    async def _settle(self) -> None:
        """Wait for every counted request to end, then for the webhooks to stop coming."""
        report = self.report
        report.counted = [x for x in report.sent if self._counts(x)]
        for x in report.counted:
            if x.kind == "sync":
                self._judge_sync(x, f"sync {x.tag}")  # a good answer names its request id
        tracked = [x for x in report.counted if x.rid]
        deadline = self.s.ttl_ms / 1000 + self.s.lease_s + 30

        async def all_ended() -> bool:
            views = await self._statuses([x.rid for x in tracked if x.first_terminal is None])
            for x in tracked:
                view = views.get(x.rid)
                if x.first_terminal is None and view and view["status"] in TERMINAL:
                    x.first_terminal = view
            return all(x.first_terminal is not None for x in tracked)
        with contextlib.suppress(AssertionError):
            await until(all_ended, deadline, "every counted request ends")
        loop = asyncio.get_running_loop()
        with contextlib.suppress(AssertionError):
            await until(lambda: loop.time() - self.receiver.last_arrival > 2.0, 40,
                        "no webhook for 2 s")
        for x, view in zip(tracked, await asyncio.gather(*(self._status(x.rid)
                                                           for x in tracked)), strict=True):
            x.final = view

    def _judge_requests(self) -> None:
        report = self.report
        for x in report.counted:
            what = f"{x.kind} {x.tag} {x.rid or '(sync)'}"
            if not x.rid:
                continue  # a sync request answered with an error: the answer is its end
            view = x.final or {}
            if view.get("status") not in TERMINAL:
                report.problem("not terminal", f"{what}: {view}")
                continue
            if x.first_terminal is not None and (
                    x.first_terminal["status"], x.first_terminal["statusCode"]) != (
                    view["status"], view["statusCode"]):
                report.problem("terminal status changed",
                               f"{what}: {x.first_terminal} then {view}")
            if x.kind == "sync" and (view["status"], view["statusCode"]) != ("succeed", 200):
                report.problem("sync answer and status disagree", f"{what}: {view}")
            if view["status"] == "succeed" and x.kind != "sync":
                self._judge_result(x, what, view)
            if x.kind == "stream":
                self._judge_stream(x, what, view)
            self._judge_webhook(x, what, view)
        for x in report.sent:
            # sent after the last gateway was up (it is never killed), and it never answered
            if x.http == 0 and x.epoch_sent == self.epoch and \
                    not x.error.startswith("ClientConnectorError"):
                report.problem("unanswered by the live gateway", f"{x.kind} {x.tag}: {x.error}")

    def _judge_sync(self, x: Sent, what: str) -> None:
        if x.http != 200:
            return
        items = x.body if isinstance(x.body, list) else []
        rids = {i.get("rid") for i in items if isinstance(i, dict)}
        expected = [{"tag": x.tag, "i": i} for i in range(x.n)]
        got = [{"tag": i.get("tag"), "i": i.get("i")} for i in items if isinstance(i, dict)]
        if got != expected or len(rids) != 1:
            self.report.problem("wrong result", f"{what}: {x.body!r:.200}")
            return
        x.rid = str(rids.pop())

    def _judge_result(self, x: Sent, what: str, view: dict[str, Any]) -> None:
        try:
            items = json.loads(base64.b64decode(view.get("result") or ""))
        except ValueError:
            items = None
        expected = [{"tag": x.tag, "i": i, "rid": x.rid} for i in range(x.n)]
        if items != expected:
            self.report.problem("wrong result", f"{what}: {items!r:.200}")

    def _judge_stream(self, x: Sent, what: str, view: dict[str, Any]) -> None:
        if x.stream_http != 200 or x.end is None:
            self.report.problem("stream did not end",
                                f"{what}: http {x.stream_http} {x.stream_error}")
            return
        if (x.end.get("status"), x.end.get("statusCode")) != (view["status"],
                                                             view["statusCode"]):
            self.report.problem("stream end and status disagree",
                                f"{what}: end {x.end}, status {view['status']}")
        seqs = [seq for seq, _ in x.chunks]
        items = [c for _, c in x.chunks]
        expected = [{"tag": x.tag, "i": i, "rid": x.rid} for i in range(len(items))]
        if seqs != sorted(set(seqs)) or items != expected or len(items) > x.n or (
                view["status"] == "succeed" and len(items) != x.n):
            self.report.problem("stream chunks wrong",
                                f"{what}: seqs {seqs}, items {items!r:.200}")

    def _judge_webhook(self, x: Sent, what: str, view: dict[str, Any]) -> None:
        got = self.receiver.delivered.get(x.rid, [])
        if len(got) == 1 and got[0].status_code != view["statusCode"]:
            self.report.problem("webhook and status disagree",
                                f"{what}: webhook {got[0].status_code}, status "
                                f"{view['status']} {view['statusCode']}")

    async def _stop_all(self) -> None:
        """SIGTERM the supervisors (they drain), then the gateway; then who is left."""
        report = self.report
        for sup in self.supervisors:
            sup.proc.signal(signal.SIGTERM)
        for sup in self.supervisors:
            with contextlib.suppress(AssertionError):
                await until(lambda p=sup.proc: not p.running(), 20,  # type: ignore[misc]
                            f"supervisor {sup.proc.pid} stops on SIGTERM")
            if sup.proc.running():
                report.problem("did not stop on SIGTERM", f"supervisor {sup.proc.pid}")
                sup.proc.signal(signal.SIGKILL)
            code = sup.proc.reap()
            if code != -signal.SIGKILL:
                report.stop_codes[f"supervisor {sup.transport} {sup.proc.pid}"] = code
        gw = self.gateway
        if gw is not None:
            gw.signal(signal.SIGTERM)
            with contextlib.suppress(AssertionError):
                await until(lambda: not gw.running(), 20, "the gateway stops on SIGTERM")
            if gw.running():
                report.problem("did not stop on SIGTERM", f"gateway {gw.pid}")
                gw.signal(signal.SIGKILL)
            report.stop_codes["gateway"] = gw.reap()
        # what the supervisors' deaths take with them goes within moments; give it 5 s
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if all(procs.cmdline(pi.pid).startswith("sleep ")
                   for pi in procs.tagged(self.run_id)):
                break
            await asyncio.sleep(0.2)  # a scan reads every process's environment: not too often
        for pi in procs.tagged(self.run_id):
            role = self.known.get((pi.pid, pi.start))
            line = f"{pi.pid} {procs.cmdline(pi.pid)!r:.120}"
            if role is not None:
                report.processes_left.append(f"{role}: {line}")
            elif procs.cmdline(pi.pid).startswith("sleep "):
                (report.helpers_left_after_supervisor_kill
                 if pi.pgid in self.supervisor_killed_children
                 else report.helpers_left_after_handler_exit).append(line)
            else:
                report.processes_left.append(f"unknown: {line}")
            procs.kill(pi.pid, pi.start)  # never leave them running on a shared machine

    async def run(self) -> Report:
        t_start = time.monotonic()
        report = self.report
        self.say(f"chaos: seed {self.s.seed}, store {self.store.name}, {self.s.seconds:g} s, "
                 f"logs in {self.work}")
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=200), cookie_jar=aiohttp.DummyCookieJar())
        await self.receiver.start()
        try:
            async with self.store.running(self.work) as flags:
                self.gateway_flags = flags
                await self._start_gateway()
                for transport in TRANSPORTS:
                    self._start_supervisor(transport)
                await until(lambda: {id(s) for s, _ in self._scan_children()} == {
                    id(s) for s in self.supervisors}, 60, "every supervisor has a handler process")
                t0 = time.monotonic()
                loops = [self._spawn(self._watch()), self._spawn(self._kill_children()),
                         self._spawn(self._schedule_kills(t0)),
                         self._spawn(self._arrivals("async", self.s.async_per_s)),
                         self._spawn(self._arrivals("stream", self.s.streams_per_s)),
                         *(self._spawn(self._sync_client()) for _ in range(self.s.sync_clients))]
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), self.s.seconds)
                self.stopping.set()
                await asyncio.gather(*loops)  # a kill in progress finishes
                pending = list(self.tasks)
                if pending:
                    await asyncio.wait(pending, timeout=self.s.sync_timeout_s + 30)
                report.epochs = self.epoch + 1
                await self._settle()
                self._judge_requests()
                report.webhook_attempts = Counter(self.receiver.attempts_by_mode)
                report.webhook_duplicates = self.receiver.duplicates()
                report.webhook_deliveries = {rid: [d.status_code for d in ds]
                                             for rid, ds in self.receiver.delivered.items()}
                by_rid = {x.rid: x for x in report.sent if x.rid}
                for rid, n in report.webhook_duplicates.items():
                    x = by_rid.get(rid)
                    about = f"{x.kind} {x.tag}, webhook {x.mode}" if x else "unknown request"
                    report.problem("webhook delivered twice",
                                   f"{rid} ({about}): {n} times, codes "
                                   f"{report.webhook_deliveries[rid]}")
                await self._stop_all()
        finally:
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            for sup in self.supervisors:
                if sup.proc.running():
                    sup.proc.signal(signal.SIGKILL)
                    sup.proc.reap()
            if self.gateway is not None and self.gateway.running():
                self.gateway.signal(signal.SIGKILL)
                self.gateway.reap()
            for pi in procs.tagged(self.run_id):
                procs.kill(pi.pid, pi.start)
            await self.session.close()
            await self.receiver.stop()
        report.seconds_total = time.monotonic() - t_start
        self.say(report.summary())
        return report


def run(settings: Settings, store: Store, workdir: Path | None = None,
        say: Callable[[str], None] = print) -> Report:
    """One chaos run in a fresh event loop (logs under ``workdir``, kept)."""
    work = workdir or Path(tempfile.mkdtemp(prefix="spirit-chaos-"))
    return asyncio.run(Chaos(settings, store, work, say).run())
