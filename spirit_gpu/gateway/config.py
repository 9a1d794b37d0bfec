"""One typed configuration for the gateway: CLI flags, ``SPIRIT_*`` env vars, code.

Precedence, highest first: command-line flag, environment variable, keyword
given in code, default. Nothing else in the gateway reads the environment.
Durations are seconds (floats, so tests can shorten them); sizes are bytes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from spirit_gpu.net.allow_entries import check_allow_entries
from spirit_gpu.settings import EnvSettings, port_number
from spirit_gpu.settings import setting as _opt

MB = 1024 * 1024


@dataclass
class GatewayConfig(EnvSettings):
    """Settings of one gateway process (public API, agent API, proxy route)."""

    host: str = _opt("127.0.0.1", "SPIRIT_HOST", "Address to listen on")
    port: int = _opt(8000, "SPIRIT_PORT", "Port to listen on", check=port_number)
    api_keys: list[str] = _opt([], "SPIRIT_API_KEYS",
                               "Client API keys (env: comma-separated); at least one",
                               flag="--api-key", metavar="KEY")
    worker_token: str = _opt("", "SPIRIT_WORKER_TOKEN",
                             "Bearer token workers must send to the agent API")
    lease_seconds: float = _opt(20.0, "SPIRIT_LEASE_SECONDS",
                                "A worker silent this long is gone: its running jobs fail")
    sync_timeout: float = _opt(180.0, "SPIRIT_SYNC_TIMEOUT",
                               "Longest a sync request waits for its result (then 408)")
    async_ttl_default: float = _opt(900.0, "SPIRIT_ASYNC_TTL_DEFAULT",
                                    "Queueing TTL of an async request without policy.ttl")
    async_ttl_max: float = _opt(86400.0, "SPIRIT_ASYNC_TTL_MAX", "Largest accepted policy.ttl")
    result_retention: float = _opt(1800.0, "SPIRIT_RESULT_RETENTION",
                                   "Seconds a finished request's status and result are kept")
    max_body_bytes: int = _opt(20 * MB, "SPIRIT_MAX_BODY_BYTES", "Largest client request body")
    max_result_bytes_sync: int = _opt(10 * MB, "SPIRIT_MAX_RESULT_BYTES_SYNC",
                                      "Largest result of a sync request")
    max_result_bytes_async: int = _opt(2 * MB, "SPIRIT_MAX_RESULT_BYTES_ASYNC",
                                       "Largest result of an async request")
    long_poll_max: float = _opt(30.0, "SPIRIT_LONG_POLL_MAX",
                                "Cap on a worker's ?wait= long-poll (seconds)")
    max_deliveries: int = _opt(3, "SPIRIT_MAX_DELIVERIES",
                               "Times a job that never started is handed out before it fails")
    sweep_interval: float = _opt(1.0, "SPIRIT_SWEEP_INTERVAL",
                                 "Seconds between lease, TTL and retention sweeps")
    store: str = _opt("memory", "SPIRIT_STORE",
                      "Where queues and results live: 'memory' (this process) or "
                      "nats://[USER:PASS@]HOST:4222[,nats://HOST2:4222...] or tls://... "
                      "(JetStream, shared by replicas)")
    store_replicas: int = _opt(1, "SPIRIT_STORE_REPLICAS",
                               "NATS store: copies of each stream (3 on a 3-node cluster)")
    proxy_response_timeout: float = _opt(180.0, "SPIRIT_PROXY_RESPONSE_TIMEOUT",
                                         "Proxy route: longest wait for the response to start")
    proxy_transfer_timeout: float = _opt(180.0, "SPIRIT_PROXY_TRANSFER_TIMEOUT",
                                         "Proxy route: longest whole transfer")
    head_timeout: float = _opt(60.0, "SPIRIT_HEAD_TIMEOUT",
                               "A connection must send a whole request head within this many "
                               "seconds of opening and of each response (then it is closed)")
    body_timeout: float = _opt(60.0, "SPIRIT_BODY_TIMEOUT",
                               "A request body must arrive whole within this many seconds of "
                               "its head (then 408 and the connection is closed)")
    max_connections: int = _opt(10000, "SPIRIT_MAX_CONNECTIONS",
                                "Open client and worker connections; more are closed at once "
                                "(lowered to fit the open-file limit)")
    link_max_credits: int = _opt(256, "SPIRIT_LINK_MAX_CREDITS",
                                 "Most jobs one worker link may be owed (its credits are capped)")
    webhook_allow: list[str] = _opt([], "SPIRIT_WEBHOOK_ALLOW",
                                    "Only accept and send webhooks to these hosts, *.suffixes, "
                                    "IPs or CIDR networks (comma-separated; empty: any but the "
                                    "refused ones)", check=check_allow_entries)
    metrics_max_sids: int = _opt(1000, "SPIRIT_METRICS_MAX_SIDS",
                                 "Serverless ids with their own /metrics label; later ones "
                                 "are counted under sid=\"_other\"")

    @classmethod
    def from_sources(cls, environ: Mapping[str, str] | None = None,
                     flags: Mapping[str, Any] | None = None,
                     **values: Any) -> GatewayConfig:
        environ = os.environ if environ is None else environ
        return (cls().apply(values).apply(cls.env_values(environ), "env")
                .apply(flags or {}, "flag"))


CONFIG_KEY: web.AppKey[GatewayConfig] = web.AppKey("spirit_gateway_config", GatewayConfig)
"""Where ``create_app`` puts the config: ``app[CONFIG_KEY]``."""
