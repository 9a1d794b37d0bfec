"""``spirit-gpu call SID '<json>'``: the Python client (spirit_gpu.client) as a command."""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from typing import Any

from spirit_gpu.client import Endpoint, JobFailed, JobStatus, SpiritError

DEFAULT_URL = "http://127.0.0.1:8000"


HELP = "send one request to a serverless id and print the answer as JSON"
DESCRIPTION = ("Runs the request (sync by default) and prints the result as JSON (bytes that "
               "are not JSON as {\"base64\": ...}). Exit status 1 when the request fails, with "
               "the status code and the server's message on stderr.")


def add_call_parser(sub: Any) -> None:
    """``call`` in ``spirit-gpu --help``; ``call_parser`` parses its arguments."""
    _arguments(sub.add_parser("call", help=HELP, description=DESCRIPTION))


def call_parser() -> argparse.ArgumentParser:
    """``spirit-gpu call``'s own parser: parsed with ``parse_intermixed_args``, so the
    input may come before or after the options (argparse's subcommands cannot)."""
    return _arguments(argparse.ArgumentParser(prog="spirit-gpu call", description=DESCRIPTION))


def _arguments(call: argparse.ArgumentParser) -> argparse.ArgumentParser:
    call.add_argument("sid", help="the serverless id")
    call.add_argument("input", nargs="?", default=None,
                      help="the request's input as JSON (e.g. '{\"x\": 2}'); '-' reads stdin")
    call.add_argument("--url", default=os.environ.get("SPIRIT_GATEWAY_URL", DEFAULT_URL),
                      help=f"gateway URL (env SPIRIT_GATEWAY_URL, default {DEFAULT_URL})")
    call.add_argument("--api-key", default=os.environ.get("SPIRIT_API_KEY", ""),
                      help="API key (env SPIRIT_API_KEY)")
    how = call.add_mutually_exclusive_group()
    how.add_argument("--async", dest="is_async", action="store_true",
                     help="submit and print {\"id\", \"sequence\"} (needs --webhook)")
    how.add_argument("--stream", action="store_true",
                     help="submit, then print each generator item as one JSON line as it "
                          "comes (needs --webhook)")
    how.add_argument("--status", metavar="ID", help="print the status of request ID")
    call.add_argument("--webhook", default=None,
                      help="URL the result is POSTed to (required by the API for --async and "
                           "--stream)")
    call.add_argument("--ttl", type=float, default=None,
                      help="seconds the request may wait in the queue (async)")
    call.add_argument("--timeout", type=float, default=200.0,
                      help="seconds to wait for a sync answer (default 200)")
    return call


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode()}
    return value


def _print(value: Any) -> None:
    print(json.dumps(_jsonable(value), ensure_ascii=False), flush=True)


def _status_json(st: JobStatus) -> dict[str, Any]:
    return {"requestID": st.request_id, "status": st.status, "statusCode": st.status_code,
            "message": st.message, "result": _jsonable(st.result)}


def call(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    ep = Endpoint(ns.url, ns.sid, ns.api_key)
    try:
        if ns.status:
            _print(_status_json(ep.status(ns.status)))
            return 0
        if ns.input is None:
            parser.error("call: give the input as JSON (or --status ID)")
        raw = sys.stdin.read() if ns.input == "-" else ns.input
        try:
            data = json.loads(raw)
        except ValueError as exc:
            parser.error(f"call: the input is not JSON: {exc}")
        if (ns.is_async or ns.stream) and not ns.webhook:
            parser.error("call: --async and --stream need --webhook URL (the serverless API "
                         "requires one for async requests)")
        if ns.is_async or ns.stream:
            job = ep.submit(data, webhook=ns.webhook, ttl=ns.ttl)
            if ns.is_async:
                _print({"id": job.id, "sequence": job.sequence})
                return 0
            for item in job.stream():
                _print(item)
            return 0
        _print(ep.run_sync(data, timeout=ns.timeout))
        return 0
    except JobFailed as exc:
        print(f"spirit-gpu call: the request failed ({exc.status}): {exc.message}",
              file=sys.stderr)
        return 1
    except SpiritError as exc:  # (worded as a failed stream is: one shape for both)
        why = f"the request failed ({exc.status}): " if exc.status else ""
        print(f"spirit-gpu call: {why}{exc.message}", file=sys.stderr)
        return 1
