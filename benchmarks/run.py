"""Run the spirit-gpu benchmarks.

``python benchmarks/run.py [--quick] [--json PATH] [--only NAME ...]``.

Prints one table (name, value, baseline, baseline value, ratio, goal, met)
and optionally writes it as JSON with a description of the machine. A
benchmark that cannot run is reported as "skipped: <why>", never dropped.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Result, Skip, machine, skipped, table, write_json  # noqa: E402

BENCHMARKS = ["ipc", "payload", "e2e_sync", "e2e_async", "e2e_nats", "proxy", "crash", "footprint"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer, shorter runs (< 5 min)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write results as JSON")
    ap.add_argument("--only", nargs="+", choices=BENCHMARKS, metavar="NAME",
                    help=f"run only these ({', '.join(BENCHMARKS)})")
    ns = ap.parse_args(argv)
    names = ns.only or BENCHMARKS
    info = machine()
    print(f"machine: {info}", flush=True)
    results: list[Result] = []
    t_all = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        print(f"running {name} ...", flush=True)
        try:
            results += importlib.import_module(name).run(ns.quick)
        except Skip as exc:
            results.append(skipped(name, str(exc)))
        except Exception as exc:  # one broken benchmark must not hide the others
            traceback.print_exc()
            results.append(skipped(name, f"failed: {type(exc).__name__}: {str(exc)[:100]}"))
        print(f"  {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    table(results, f"spirit-gpu benchmarks ({'quick' if ns.quick else 'full'}; "
                   f"{info['cpus']} CPUs; {time.perf_counter() - t_all:.0f} s)")
    if ns.json:
        write_json(ns.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
