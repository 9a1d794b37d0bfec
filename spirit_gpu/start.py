"""``start()``: the one call a worker script makes."""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

from spirit_gpu.log import logger

SUPERVISOR_ENV = "SPIRIT_SUPERVISED"


def start(config: dict[str, Any]) -> None:
    """Run this script as a spirit-gpu worker.

    Keys: ``handler`` (``handler(request, env)``: sync, async, generator or async
    generator), ``concurrency_modifier`` (``f(current) -> int``), or for proxy
    mode ``mode="proxy"``, ``base_url`` and ``check_start``. Any worker setting
    (see ``WorkerConfig``, e.g. ``"job_timeout": 30``) may be given too.

    Under the supervisor (``python -m spirit_gpu.supervisor main.py``) this
    serves jobs and never returns. Run as ``python main.py`` it hands over to a
    supervisor, which runs this script again in each handler process.
    """
    from spirit_gpu.child import channel as channel_mod

    chan = channel_mod.CHANNEL
    if chan is not None:
        from spirit_gpu.child.runtime import serve
        serve(chan, config)
    from spirit_gpu.config import WorkerConfig
    from spirit_gpu.settings import SettingError

    try:
        in_process = WorkerConfig.from_sources(config).in_process
    except SettingError as exc:
        print(f"spirit-gpu: {exc}", file=sys.stderr)
        sys.exit(2)
    if in_process:
        from spirit_gpu.supervisor.inprocess import run_in_process
        sys.exit(run_in_process(config))
    _hand_over()


def _hand_over() -> NoReturn:
    if os.environ.get(SUPERVISOR_ENV):
        raise RuntimeError("start() was called in the supervisor process: the supervisor "
                           "must never import the worker script")
    script = os.path.abspath(sys.argv[0])
    shown = sys.argv[0] if sys.argv[0] and not os.path.isabs(sys.argv[0]) else script
    logger.info(
        "start() is handing over to `python -m spirit_gpu.supervisor "
        f"{shown}`: handler processes run this script again, so its "
        "module-level code (e.g. model loading) runs once more there. Start the worker "
        "with that command to run it only in the handler processes.")
    script_args = ["--", *sys.argv[1:]] if len(sys.argv) > 1 else []  # the script's, verbatim
    argv = [sys.executable, "-m", "spirit_gpu.supervisor", script, *script_args]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)
