"""One typed configuration for the worker: start() keys, CLI flags, env vars.

Precedence, highest first: command-line flag, environment variable, start()
key, default. Nothing else in the package reads worker settings from the
environment. The config is frozen: the supervisor builds it once its first
handler process has said which start() keys it has (``Pool`` calls
``from_sources`` then), and handler processes resolve the same one (the
supervisor's flags reach them as environment variables: ``child_environ``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from spirit_gpu.net.allow_entries import check_allow_entries
from spirit_gpu.settings import EnvSettings, one_of, port_number
from spirit_gpu.settings import setting as _opt

# never handed to handler processes through their environment
SECRET_FIELDS = frozenset({"worker_token"})


@dataclass(frozen=True)
class WorkerConfig(EnvSettings):
    """Settings of the supervisor and its handler children."""

    agent_url: str = _opt("http://localhost:8087", "EASE_AGENT_URL",
                          "Agent API base URL (a gateway: http://HOST:PORT/agent/<sid>)")
    heartbeat_interval: float = _opt(5.0, "EASE_HEARTBEAT_INTERVAL", "Seconds between heartbeats")
    test_mode: bool = _opt(False, "EASE_TEST_MODE",
                           "Serve POST / locally instead of talking to an agent")
    test_port: int = _opt(8080, "EASE_TEST_PORT", "Port of the test-mode server",
                          check=port_number)
    test_host: str = _opt("127.0.0.1", "SPIRIT_TEST_HOST",
                          "Address of the test-mode server (0.0.0.0 inside a container)")
    log_level: str = _opt("INFO", "EASE_LOG_LEVEL", "DEBUG, INFO, WARNING, ERROR")
    worker_token: str = _opt("", "SPIRIT_WORKER_TOKEN",
                             "Bearer token sent to the agent API (self-hosted gateway)")
    transport: str = _opt("auto", "SPIRIT_TRANSPORT",
                          "auto (multiplexed link when offered), plain, or link",
                          check=one_of("auto", "plain", "link"))
    max_children: int = _opt(8, "SPIRIT_MAX_CHILDREN",
                             "Upper bound on handler processes (sync/generator handlers)")
    min_children: int = _opt(1, "SPIRIT_MIN_CHILDREN",
                             "Handler processes kept warm when idle (at most the concurrency)")
    async_children: int = _opt(1, "SPIRIT_ASYNC_CHILDREN",
                               "Handler processes for async handlers (jobs multiplex as tasks)")
    idle_timeout: float = _opt(60.0, "SPIRIT_IDLE_TIMEOUT",
                               "Seconds before an idle surplus child is retired")
    job_timeout: float = _opt(0.0, "SPIRIT_JOB_TIMEOUT",
                              "Per-job execution limit in seconds, 0 for none (reported as 408)")
    max_jobs_per_child: int = _opt(0, "SPIRIT_MAX_JOBS_PER_CHILD",
                                   "Replace a child after this many jobs, 0 for never")
    grace_period: float = _opt(30.0, "SPIRIT_GRACE_PERIOD",
                               "Seconds running jobs get to finish on SIGTERM/SIGINT")
    ping_interval: float = _opt(2.0, "SPIRIT_PING_INTERVAL", "Seconds between liveness pings")
    ping_timeout: float = _opt(30.0, "SPIRIT_PING_TIMEOUT",
                               "Seconds without a liveness answer before a child is killed")
    concurrency_interval: float = _opt(1.0, "SPIRIT_CONCURRENCY_INTERVAL",
                                       "Seconds between concurrency_modifier calls")
    crash_backoff_max: float = _opt(30.0, "SPIRIT_CRASH_BACKOFF_MAX",
                                    "Longest wait before restarting a crash-looping child")
    max_frame_mb: float = _opt(64.0, "SPIRIT_MAX_FRAME_MB",
                               "Largest supervisor<->handler message in MiB (a request, result "
                               "or stream chunk); a handler process sending more is killed")
    max_crashes: int = _opt(5, "SPIRIT_MAX_CRASHES",
                            "Handler process crashes in a row (or CUDA out-of-memory errors) "
                            "after which the worker stops taking jobs and exits 4; 0 for never")
    webhook_attempts: int = _opt(5, "SPIRIT_WEBHOOK_ATTEMPTS", "Webhook delivery attempts")
    webhook_backoff: float = _opt(0.5, "SPIRIT_WEBHOOK_BACKOFF",
                                  "First webhook retry delay in seconds (doubles)")
    webhook_timeout: float = _opt(10.0, "SPIRIT_WEBHOOK_TIMEOUT", "Seconds per webhook attempt")
    webhook_concurrency: int = _opt(16, "SPIRIT_WEBHOOK_CONCURRENCY",
                                    "Webhook deliveries under way at once (in the background)")
    webhook_queue: int = _opt(1000, "SPIRIT_WEBHOOK_QUEUE",
                              "Webhook deliveries that may wait; past it a job waits for room "
                              "(holding its slot), so a burst slows pulls and loses nothing")
    webhook_allow: list[str] = _opt([], "SPIRIT_WEBHOOK_ALLOW",
                                    "Only send webhooks to these hosts, *.suffixes, IPs or CIDR "
                                    "networks (comma-separated; empty: any but the refused ones)",
                                    check=check_allow_entries)
    pull_backoff_max: float = _opt(1.0, "SPIRIT_PULL_BACKOFF_MAX",
                                   "Longest wait between pulls when the queue is empty")
    in_process: bool = _opt(False, "SPIRIT_IN_PROCESS",
                            "Run handlers in the supervisor process (debugging only)")
    proxy_host: str = _opt("127.0.0.1", "SPIRIT_PROXY_HOST", "Proxy mode: listener address")
    proxy_port: int = _opt(0, "SPIRIT_PROXY_PORT", "Proxy mode: listener port (0 picks one)",
                           check=port_number)
    proxy_advertise_url: str = _opt("", "SPIRIT_PROXY_ADVERTISE_URL",
                                    "Proxy mode: URL the gateway uses to reach this worker")
    start_deadline: float = _opt(600.0, "SPIRIT_START_DEADLINE",
                                 "Proxy mode: seconds for check_start to return True")

    @property
    def max_frame(self) -> int:
        """``max_frame_mb`` in bytes."""
        return max(1024, int(self.max_frame_mb * (1 << 20)))

    @classmethod
    def from_sources(cls, start_options: Mapping[str, Any] | None = None,
                     environ: Mapping[str, str] | None = None,
                     flags: Mapping[str, Any] | None = None) -> WorkerConfig:
        """Raises ``SettingError`` (one line naming the flag, env var or key) on a bad value."""
        environ = os.environ if environ is None else environ
        return (cls().apply(start_options or {}, "start").apply(cls.env_values(environ), "env")
                .apply(flags or {}, "flag"))


def secret_env_names() -> frozenset[str]:
    """The env vars of SECRET_FIELDS: a handler process's environment never has them."""
    return frozenset(f.metadata["env"] for f in fields(WorkerConfig) if f.name in SECRET_FIELDS)


def child_environ(flags: Mapping[str, Any], secrets: bool = False) -> dict[str, str]:
    """The supervisor's flags as the env vars a handler process reads (secrets left out
    unless asked for), so that it resolves the same config as the supervisor."""
    env = {f.name: f.metadata["env"] for f in fields(WorkerConfig)}
    return {env[name]: ",".join(map(str, value)) if isinstance(value, list) else str(value)
            for name, value in flags.items()
            if name in env and (secrets or name not in SECRET_FIELDS) and value is not None}


def start_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-able part of start()'s config that the supervisor acts on."""
    names = set(WorkerConfig.names())
    options = {k: v for k, v in config.items()
               if k in names and isinstance(v, str | int | float | bool)}
    options["mode"] = str(config.get("mode") or "handler")
    if options["mode"] == "proxy":
        base_url = config.get("base_url")
        if not isinstance(base_url, str) or not base_url:
            raise ValueError("start() in proxy mode needs \"base_url\", e.g. "
                             "\"http://127.0.0.1:11434\"")
        scheme, sep, rest = base_url.partition("://")
        if scheme.lower() not in ("http", "https") or not sep or not rest.strip("/"):
            raise ValueError(f"\"base_url\" must be an http:// or https:// URL with a host, "
                             f"e.g. \"http://127.0.0.1:11434\"; got {base_url!r}")
        options["base_url"] = base_url
    elif not callable(config.get("handler")):
        raise TypeError("start() needs a \"handler\": a function handler(request, env)")
    modifier = config.get("concurrency_modifier")
    if modifier is not None and not callable(modifier):
        raise TypeError("\"concurrency_modifier\" must be a function f(current: int) -> int")
    return options
