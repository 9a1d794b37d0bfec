"""``python -m spirit_gpu.supervisor main.py [options]``: the canonical worker entry."""

from __future__ import annotations

import argparse
import difflib
import os
import runpy
import sys
from typing import Any

from spirit_gpu.config import WorkerConfig, child_environ
from spirit_gpu.settings import SettingError, add_flags


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m spirit_gpu.supervisor",
        usage="%(prog)s SCRIPT [options] [-- script args]",
        description="Run a spirit-gpu worker script: this process talks to the platform, "
                    "handler processes run the script.")
    parser.add_argument("script", help="the worker script that calls spirit_gpu.start()")
    add_flags(parser, WorkerConfig)
    return parser


def _near_miss(arg: str) -> str | None:
    """One of our flags that ``arg`` (an unknown ``--flag``) looks like a typo of."""
    if not arg.startswith("--") or arg == "--":
        return None
    name = arg.split("=", 1)[0]
    close = difflib.get_close_matches(name, WorkerConfig.flag_names(), n=1, cutoff=0.85)
    return close[0] if close else None


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """Supervisor flags may come before or after the script (``main.py --job-timeout 30``);
    anything else, and everything after ``--``, is passed to the script. An unknown
    ``--flag`` close to one of ours is refused (exit 2): it is a typo, not the script's."""
    parser = _parser()
    args = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in args:
        cut = args.index("--")
        args, passthrough = args[:cut], args[cut + 1:]
    ns, unknown = parser.parse_known_args(args)
    for arg in unknown:
        near = _near_miss(arg)
        if near is not None:
            parser.error(f"unrecognized argument {arg.split('=', 1)[0]}: did you mean {near}? "
                         "(arguments for the script go after --)")
    return ns, unknown + passthrough


def main(argv: list[str] | None = None) -> int:
    ns, script_args = parse(argv)
    script = os.path.abspath(ns.script)
    if not os.path.isfile(script):
        print(f"spirit-gpu: no such script: {ns.script}", file=sys.stderr)
        return 2
    flags = WorkerConfig.flag_values(ns)
    try:
        cfg = WorkerConfig.from_sources(flags=flags)
    except SettingError as exc:
        print(f"spirit-gpu: {exc}", file=sys.stderr)
        return 2
    if cfg.in_process:
        return _in_process(script, script_args, flags)
    os.environ["SPIRIT_SUPERVISED"] = "1"
    if os.getpid() == 1 and not os.environ.get("SPIRIT_NO_INIT"):
        from spirit_gpu.supervisor.init import run_as_init
        run_as_init()
    from spirit_gpu.log import logger
    logger.set_level(cfg.log_level)
    from spirit_gpu.loop import run
    from spirit_gpu.supervisor.app import Supervisor

    async def serve() -> int:
        return await Supervisor(cfg, script, script_args, flags).serve()

    code = run(serve())
    return int(code) if isinstance(code, int) else 0


def _in_process(script: str, script_args: list[str], flags: dict[str, Any]) -> int:
    """``--in-process`` (debugging): no handler processes and no supervisor of them; the
    script runs here, and its start() serves with its handlers in this process. The
    flags reach it as the env vars they stand for."""
    os.environ.update(child_environ(flags, secrets=True))
    os.environ["SPIRIT_IN_PROCESS"] = "1"
    sys.argv = [script, *script_args]
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")  # start() exits the process when done
    print(f"spirit-gpu: {script} ended without calling spirit_gpu.start()", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
