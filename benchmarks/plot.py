"""Draw the saved runs' goals as one PNG: how far each ratio is from its goal.

``python benchmarks/plot.py [RUN.json ...] [--out docs/performance.png] [--markdown]``
(default: every run under benchmarks/results/; ``--markdown`` also prints the
latest run as a Markdown table, as docs/performance.md shows it). Each goal becomes a
headroom: measured / goal for a "≥" goal, goal / measured for a "≤" goal, so
1 is the goal line and above it the goal is met. Left: the latest run, one
bar per goal (skipped ones named, with their reason). Right: every saved run
in date order, one line per goal, so a regression shows as a line crossing 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_OUT = HERE.parent / "docs" / "performance.png"
CAP = 100.0  # headroom drawn at most this far from 1 (a 0 ms overhead is infinitely good)


def headroom(row: dict[str, Any]) -> float | None:
    """measured vs goal, > 1 when met; None when the row has no goal or no figure."""
    op, goal = row.get("goal_op"), row.get("goal_value")
    if op is None or goal is None or isinstance(row.get("met"), str):
        return None
    subject = row["ratio"] if row.get("goal_on") == "ratio" else row["value"]
    if subject is None:
        return None
    if op == "==":
        return 1.25 if row.get("met") else 0.8
    if op in (">=", ">"):
        h = subject / goal if goal else CAP
    else:
        h = goal / subject if subject > 0 else CAP
    return max(1 / CAP, min(CAP, h))


_SIGNS = {"<=": "≤", "<": "<", ">=": "≥", ">": ">", "==": "="}


def key(row: dict[str, Any]) -> str:
    """One goal across runs: the row's name, its baseline and the goal itself."""
    base = f" vs {row['baseline']}" if row.get("baseline") else ""
    unit = "×" if row.get("goal_on") == "ratio" or (row.get("goal_on") is None
                                                   and row.get("baseline")) else ""
    return f"{row['name']}{base} ({_SIGNS.get(row['goal_op'], '?')} {row['goal_value']:g}{unit})"


def load(paths: list[Path]) -> list[dict[str, Any]]:
    runs = [json.loads(p.read_text()) for p in paths]
    for run, path in zip(runs, paths, strict=True):
        run.setdefault("date", path.stem)
        run.setdefault("commit", "unknown")
    return sorted(runs, key=lambda r: r["date"])


def draw(runs: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latest = runs[-1]
    goals = [r for r in latest["results"] if r.get("goal_op") is not None]
    labels = [key(r) for r in goals]
    fig_h = max(4.0, 0.32 * len(goals) + 1.5)
    fig, (left, right) = plt.subplots(1, 2, figsize=(20, fig_h), layout="constrained",
                                      gridspec_kw={"width_ratios": [3, 2]})
    for i, row in enumerate(goals):
        h = headroom(row)
        if h is None:
            why = row["met"] if isinstance(row.get("met"), str) else "no figure"
            left.text(1 / CAP * 1.1, i, why[:90], va="center", fontsize=7, color="grey",
                      bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
            continue
        left.barh(i, h, left=0, color="tab:green" if h >= 1 else "tab:red")
        measured = row["ratio"] if row.get("goal_on") == "ratio" else row["value"]
        left.text(h * 1.05, i, f"{measured:.3g}", va="center", fontsize=7)
    left.set_xscale("log")
    left.set_xlim(1 / CAP, CAP)
    left.axvline(1, color="black", linewidth=1)
    left.set_yticks(range(len(goals)), labels, fontsize=7)
    left.invert_yaxis()
    left.set_xlabel("headroom over the goal (≥ 1: met)")
    left.set_title(f"latest run: {latest['date']}, {str(latest['commit'])[:10]}, "
                   f"{latest.get('mode', '')}, {latest.get('machine', {}).get('cpus', '?')} CPUs",
                   fontsize=9)

    xs = list(range(len(runs)))
    seen: list[float] = []
    for label in labels:
        ys = []
        for run in runs:
            match = [r for r in run["results"] if r.get("goal_op") and key(r) == label]
            ys.append(headroom(match[0]) if match else None)
        pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
        seen += [y for _, y in pts]
        if pts:
            right.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linewidth=1,
                       markersize=3)
    right.set_yscale("log")
    right.set_ylim(min([0.2, *seen]) / 1.2, max([5.0, *seen]) * 1.2)
    right.axhline(1, color="black", linewidth=1)
    right.set_xticks(xs, [f"{r['date'][:16]}\n{str(r['commit'])[:7]}" for r in runs],
                     fontsize=6, rotation=45, ha="right")
    right.set_ylabel("headroom over the goal")
    right.set_title(f"all saved runs ({len(runs)}), one line per goal", fontsize=9)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _cell(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def markdown(run: dict[str, Any]) -> str:
    m = run.get("machine", {})
    lines = [f"Run {run['date']}, commit {str(run['commit'])[:10]}"
             f"{' (uncommitted changes)' if run.get('dirty') else ''}, {run.get('mode', '')}, "
             f"{m.get('cpus', '?')} × {m.get('processor', '?')}, Python {m.get('python', '?')}.",
             "", "| name | value | baseline | baseline value | ratio | goal | met |",
             "|---|---|---|---|---|---|---|"]
    for r in run["results"]:
        met = r.get("met")
        shown = met if isinstance(met, str) else {True: "yes", False: "**no**", None: ""}[met]
        ratio = "" if r.get("ratio") is None else f"{r['ratio']:.2f}×"
        value = f"{_cell(r['value'])} {r['unit']}".strip()
        lines.append(f"| {r['name']} | {value} | {r['baseline']} | "
                     f"{_cell(r['baseline_value']) if r['baseline'] else ''} | {ratio} | "
                     f"{r['goal']} | {shown} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", type=Path, help="run JSON files (default: results/)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG to write")
    ap.add_argument("--markdown", action="store_true",
                    help="also print the latest run as a Markdown table")
    ns = ap.parse_args(argv)
    paths = ns.runs or sorted(RESULTS.glob("*.json"))
    if not paths:
        print(f"no runs in {RESULTS}: run benchmarks/run.py first", file=sys.stderr)
        return 1
    runs = load(paths)
    draw(runs, ns.out)
    print(f"wrote {ns.out} ({len(paths)} runs)")
    if ns.markdown:
        print(markdown(runs[-1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
