"""Run the spirit-gpu benchmarks.

``python benchmarks/run.py [--quick] [--json PATH] [--only NAME ...] [--no-save]``.

Prints one table (name, value, baseline, baseline value, ratio, goal, met),
saves the run as JSON under benchmarks/results/ (machine, commit, date; see
``common.save_run``) and, with ``--json``, also writes it to PATH. A
benchmark that cannot run is reported as "skipped: <why>", never dropped.

A benchmark is a module in this folder with ``run(quick: bool) ->
list[common.Result]`` (raising ``common.Skip`` when it cannot run here); to add
one, append its module name to ``BENCHMARKS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Result, Skip, machine, save_run, skipped, table, write_json  # noqa: E402

BENCHMARKS = ["ipc", "payload", "e2e_sync", "e2e_async", "e2e_nats", "proxy", "scale", "crash",
              "footprint", "gpu"]


def run_one(name: str, quick: bool) -> list[Result]:
    try:
        module = importlib.import_module(name)
        return list(module.run(quick))
    except Skip as exc:
        return [skipped(name, str(exc))]
    except Exception as exc:  # one broken benchmark must not hide the others
        traceback.print_exc()
        return [skipped(name, f"failed: {type(exc).__name__}: {str(exc)[:160]}")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer, shorter, smaller runs (minutes)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write results as JSON")
    ap.add_argument("--only", nargs="+", choices=BENCHMARKS, metavar="NAME",
                    help=f"run only these ({', '.join(BENCHMARKS)})")
    ap.add_argument("--no-save", action="store_true",
                    help="do not save the run under benchmarks/results/")
    ns = ap.parse_args(argv)
    names = ns.only or BENCHMARKS
    mode = "quick" if ns.quick else "full"
    info = machine()
    print(f"machine: {info}", flush=True)
    results: list[Result] = []
    t_all = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        print(f"running {name} ...", flush=True)
        results += run_one(name, ns.quick)
        print(f"  {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    seconds = round(time.perf_counter() - t_all, 1)
    table(results, f"spirit-gpu benchmarks ({mode}; {info['cpus']} CPUs; {seconds:.0f} s)")
    if not ns.no_save:
        print(f"saved: {save_run(results, mode, seconds)}")
    if ns.json:
        write_json(ns.json, results, mode, seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
