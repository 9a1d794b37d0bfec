"""``spirit-gpu gateway``, ``spirit-gpu dev main.py`` and ``spirit-gpu call``."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shlex
import signal
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from spirit_gpu.gateway.config import GatewayConfig
from spirit_gpu.settings import SettingError, add_flags

DEV_SID = "local"
# after a second Ctrl-C (the worker's "stop now"), seconds before it is killed; after the
# first, the worker ends itself once its own grace period (--grace-period) is over
STOP_NOW_WAIT = 15.0
# answered by the README's and examples/hello's main.py
EXAMPLE_INPUT: Any = {"x": 21}
_PROXY_MODE = re.compile(r"""["']mode["']\s*:\s*["']proxy["']|mode\s*=\s*["']proxy["']""")


def _config(ns: argparse.Namespace, **forced: Any) -> GatewayConfig:
    names = set(GatewayConfig.names())
    flags = {k: v for k, v in vars(ns).items() if k in names and v is not None}
    return GatewayConfig.from_sources(flags={**flags, **forced})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spirit-gpu",
                                     description="spirit-gpu: self-hosted gateway and local dev")
    sub = parser.add_subparsers(dest="command", required=True)
    gw = sub.add_parser("gateway", help="serve the public serverless API and the agent API",
                        description="Every flag is also a SPIRIT_* environment variable.")
    add_flags(gw, GatewayConfig)
    dev = sub.add_parser("dev", help="gateway + worker for one script, in one command",
                         allow_abbrev=False,
                         description="Runs the gateway and `python -m spirit_gpu.supervisor "
                                     "SCRIPT` for serverless id 'local'. Flags that are not "
                                     "the gateway's (e.g. --job-timeout 30) go to the worker; "
                                     "arguments after -- go to the script.")
    dev.add_argument("script", help="the worker script that calls spirit_gpu.start()")
    add_flags(dev, GatewayConfig)
    _add_agent_parser(sub)
    from spirit_gpu.client_cli import add_call_parser

    add_call_parser(sub)
    return parser


def _add_agent_parser(sub: Any) -> None:
    ag = sub.add_parser(
        "agent", help="agent sidecar beside one worker: the agent API at the root, relayed "
                      "to a gateway",
        description="Serves /apis/v1/... at the root, as the hosted platform's agent does, and "
                    "relays every call to GATEWAY/agent/SID/apis/v1/...: a worker with the "
                    "default EASE_AGENT_URL (http://localhost:8087), the original spirit-gpu "
                    "worker included, works against the gateway unmodified. Run one per worker.")
    ag.add_argument("--gateway", required=True, metavar="URL", type=_http_url,
                    help="the gateway's base URL, e.g. http://127.0.0.1:8000")
    ag.add_argument("--serverless-id", required=True, metavar="SID",
                    help="the serverless id whose requests this worker serves")
    ag.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    ag.add_argument("--port", type=int, default=8087, help="port to listen on (8087)")
    ag.add_argument("--worker-token", default=os.environ.get("SPIRIT_WORKER_TOKEN", ""),
                    metavar="T", help="the gateway's worker token (env SPIRIT_WORKER_TOKEN)")


def _http_url(text: str) -> str:
    """An http(s) URL with a host (argparse refuses anything else with exit 2)."""
    url = urlsplit(text.strip())
    if url.scheme not in ("http", "https") or not url.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http(s) URL with a host, e.g. "
                                         "http://127.0.0.1:8000")
    return text.strip()


async def _agent(ns: argparse.Namespace) -> int:
    from spirit_gpu.gateway.sidecar import Sidecar, serve_sidecar

    sidecar = Sidecar(ns.gateway, ns.serverless_id, ns.worker_token)

    def ready(port: int) -> None:
        print(f"spirit-gpu agent listening on http://{ns.host}:{port}, relaying to "
              f"{sidecar.upstream} as {sidecar.identity}", flush=True)

    await serve_sidecar(sidecar, ns.host, ns.port, _stop_event(), ready)
    return 0


def _stop_event() -> asyncio.Event:
    """Set by SIGINT/SIGTERM (the handlers do nothing else)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _err(message: str) -> None:
    print(f"spirit-gpu: {message}", file=sys.stderr)


async def _gateway(config: GatewayConfig) -> int:
    from spirit_gpu.gateway.server import serve

    stop = _stop_event()

    def ready(port: int) -> None:
        print(f"spirit-gpu gateway listening on http://{config.host}:{port} "
              f"({len(config.api_keys)} API key(s), worker token "
              f"{'required' if config.worker_token else 'off'})", flush=True)

    await serve(config, stop, ready)
    return 0


def example_body(script: str) -> str:
    """The JSON body of dev's sample request: ``test_input.json`` beside the script
    (as runpod projects keep it) when there is one, else ``{"input": EXAMPLE_INPUT}``."""
    beside = Path(script).with_name("test_input.json")
    if beside.is_file():
        try:
            body = json.loads(beside.read_text())
        except (OSError, ValueError) as exc:
            _err(f"ignoring {beside}: not JSON ({exc})")
        else:
            return json.dumps(body if isinstance(body, dict) and "input" in body
                              else {"input": body})
    return json.dumps({"input": EXAMPLE_INPUT})


def is_proxy_script(script: str) -> bool:
    try:
        return bool(_PROXY_MODE.search(Path(script).read_text(errors="replace")))
    except OSError:
        return False


def banner(url: str, sid: str, api_key: str, script: str) -> str:
    """What dev prints: plain lines, so a copied curl pastes as it is."""
    if is_proxy_script(script):
        tryit = (f"curl -s {url}/v1/models -H {shlex.quote(f'Auth: {sid}-{api_key}')}\n"
                 "(proxy mode: any /api/*, /v1/* or /v1/chat/* path goes to your LLM server)")
    else:
        body = example_body(script)
        tryit = (f"curl -s -X POST {url}/v1/{sid}/sync \\\n"
                 f"  -H {shlex.quote('Authorization: Bearer ' + api_key)} \\\n"
                 f"  -H 'Content-Type: application/json' \\\n"
                 f"  -d {shlex.quote(body)}\n\n"
                 f"or: spirit-gpu call {sid} --url {url} --api-key {api_key} "
                 f"{shlex.quote(json.dumps(json.loads(body)['input']))}")
    return (f"spirit-gpu dev: gateway {url}, serverless id {sid}\n"
            f"API key: {api_key}\n\ntry it:\n\n{tryit}\n\n"
            "API: /openapi.json   Ctrl-C stops both: running jobs get the worker's grace "
            "period (--grace-period, default 30 s); Ctrl-C again stops them at once.\n")


async def _dev(config: GatewayConfig, script: str, worker_args: list[str]) -> int:
    from spirit_gpu.gateway.server import serve

    signals: asyncio.Queue[int] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    # SIGHUP too: a closed terminal must not leave the worker (in its own session) behind
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, signals.put_nowait, sig)  # handlers only queue
    gateway_stop = asyncio.Event()
    bound: asyncio.Future[int] = loop.create_future()
    server = asyncio.create_task(serve(config, gateway_stop, bound.set_result))
    first: set[asyncio.Future[Any]] = {server, bound}
    await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
    if not bound.done():
        await server  # raises why it could not start
        return 1
    port = bound.result()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, EASE_AGENT_URL=f"{url}/agent/{DEV_SID}",
               SPIRIT_WORKER_TOKEN=config.worker_token)
    # its own session: a terminal's Ctrl-C reaches dev only, which passes it on once
    # (a second signal straight from the terminal would mean "stop now" to the worker)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "spirit_gpu.supervisor", script, *worker_args, env=env,
        start_new_session=True)
    print(banner(url, DEV_SID, config.api_keys[0], script), flush=True)
    exited = asyncio.create_task(proc.wait())
    code = 0
    signalled = 0
    while not exited.done():
        got = asyncio.create_task(signals.get())
        await asyncio.wait({exited, got}, return_when=asyncio.FIRST_COMPLETED,
                           timeout=STOP_NOW_WAIT if signalled >= 2 else None)
        if not got.done():
            got.cancel()
            if not exited.done():
                _err(f"the worker did not stop within {STOP_NOW_WAIT:g} s; killing it")
                proc.kill()
                await exited
            break
        signalled += 1
        if proc.returncode is None and signalled > 2:
            _err("killing the worker")
            proc.kill()
        elif proc.returncode is None:
            proc.send_signal(signal.SIGTERM)  # the first drains, the second stops at once
    if not signalled:
        code = proc.returncode or 0
        code = 128 - code if code < 0 else code
        if code:
            _err(f"the worker exited with code {code}; stopping")
    gateway_stop.set()
    await server
    return code


def _code(value: object) -> int:
    return value if isinstance(value, int) else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["call"]:
        from spirit_gpu.client_cli import call, call_parser

        call_args = call_parser()
        return call(call_args.parse_intermixed_args(argv[1:]), call_args)
    parser = _parser()
    ns, rest = parser.parse_known_args(argv)
    if rest and ns.command != "dev":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if ns.command == "agent":
        from spirit_gpu.loop import run as run_loop

        try:
            return _code(run_loop(_agent(ns)))
        except OSError as exc:
            _err(str(exc))
            return 1
    from spirit_gpu.extras import require

    require("gateway", f"spirit-gpu {ns.command}")
    from spirit_gpu.gateway.server import ConfigRefused, check
    from spirit_gpu.loop import run

    try:
        if ns.command == "gateway":
            config = _config(ns)
            check(config)
            return _code(run(_gateway(config)))
        if not os.path.isfile(ns.script):
            flags_first = [a for a in rest if a.endswith(".py")]
            hint = (f" (worker flags go after the script: spirit-gpu dev {flags_first[0]} "
                    "--flag value)") if flags_first else ""
            _err(f"no such script: {ns.script}{hint}")
            return 2
        config = _config(ns)
        forced: dict[str, Any] = {}
        if not config.api_keys:
            forced["api_keys"] = [secrets.token_urlsafe(24)]
        if not config.worker_token:
            forced["worker_token"] = secrets.token_urlsafe(24)
        config = _config(ns, **forced)
        check(config)
        return _code(run(_dev(config, os.path.abspath(ns.script), rest)))
    except (ConfigRefused, SettingError) as exc:
        _err(str(exc))
        return 2
    except (OSError, ValueError) as exc:
        _err(str(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
