"""LiteLLM's proxy as a peer of the proxy path: started from its own venv, offline.

``benchmarks/install.sh`` installs ``litellm[proxy]`` into ``benchmarks/.venv-litellm``
(or ``$LITELLM_VENV``). It runs with one model routed to the benchmark's fake
LLM server (OpenAI-compatible, ``/v1``), a master key, and nothing external or
optional: the local cost map, no telemetry, callbacks, retries or request logs.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from common import HERE, free_port, spawn, wait_ok

VENV = Path(os.environ.get("LITELLM_VENV", HERE / ".venv-litellm"))
MASTER_KEY = "sk-bench-master"
MODEL = "m"

CONFIG = """model_list:
  - model_name: {model}
    litellm_params:
      model: openai/{model}
      api_base: {upstream}/v1
      api_key: sk-none
      num_retries: 0
litellm_settings:
  telemetry: false
  num_retries: 0
  request_timeout: 30
  callbacks: []
  success_callback: []
  failure_callback: []
  drop_params: false
  set_verbose: false
  json_logs: false
  turn_off_message_logging: true
general_settings:
  master_key: {key}
  disable_spend_logs: true
  disable_error_logs: true
  disable_adding_master_key_hash_to_db: true
  allow_requests_on_db_unavailable: true
  background_health_checks: false
"""

_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False",
    "LITELLM_LOG": "ERROR", "LITELLM_MODE": "PRODUCTION", "DISABLE_SCHEMA_UPDATE": "True",
    "NO_DOCS": "True", "NO_REDOC": "True", "DATABASE_URL": "", "STORE_MODEL_IN_DB": "False",
    "HTTP_PROXY": "", "HTTPS_PROXY": "", "NO_PROXY": "127.0.0.1,localhost",
}


def available() -> str:
    """'' when the peer can run here, else why not."""
    if not (VENV / "bin" / "python").exists():
        return f"LiteLLM not installed in {VENV} (run benchmarks/install.sh)"
    return ""


def start(procs: list[subprocess.Popen[bytes]], upstream: str,
          tmp: str) -> tuple[str, dict[str, str]]:
    """Start LiteLLM's proxy in front of ``upstream``; (base URL, auth headers)."""
    conf = Path(tmp) / "litellm.yaml"
    conf.write_text(CONFIG.format(model=MODEL, upstream=upstream, key=MASTER_KEY))
    port = free_port()
    env = {k: v for k, v in _ENV.items() if v} | {"NO_PROXY": _ENV["NO_PROXY"]}
    procs.append(spawn([str(VENV / "bin" / "python"), "-c",
                        "from litellm.proxy.proxy_cli import run_server; run_server()",
                        "--config", str(conf), "--host", "127.0.0.1", "--port", str(port),
                        "--num_workers", "1"], "litellm", **env))
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {MASTER_KEY}"}
    wait_ok(url + "/v1/chat/completions", CHAT_PLAIN, headers, within=120, proc=procs[-1])
    return url, headers


CHAT_PLAIN = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": false}'
