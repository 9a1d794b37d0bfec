"""The benchmark harness itself: goals as data, skipped rows kept, saved runs, the plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import plot  # noqa: E402


def test_a_target_on_a_ratio_decides_met_and_is_kept_as_data() -> None:
    met = common.result("x", 30.0, "µs", "floor", 10.0, target=("<=", 3.0))
    missed = common.result("x", 31.0, "µs", "floor", 10.0, target=("<=", 3.0))
    assert (met.met, missed.met) == (True, False)
    assert (met.goal_op, met.goal_value, met.goal_on, met.goal) == ("<=", 3.0, "ratio", "≤ 3×")


def test_a_target_without_a_baseline_applies_to_the_value() -> None:
    row = common.result("added p99", 12.0, "ms", goal="< 10 ms (detail)", target=("<", 10.0))
    assert row.met is False and row.goal_on == "value" and row.goal == "< 10 ms (detail)"


def test_a_skipped_row_keeps_its_goal_and_reason() -> None:
    row = common.skipped("proxy streamed", "nginx not installed", "req/s", "nginx 1-hop",
                         target=(">=", 1.0))
    assert row.met == "skipped: nginx not installed"
    assert (row.goal_op, row.goal_value, row.goal) == (">=", 1.0, "≥ 1×")


def test_headroom_is_above_one_exactly_when_the_goal_is_met() -> None:
    rows = [common.result("a", 5.0, "", "b", 1.0, target=(">=", 2.0)),
            common.result("a", 1.0, "", "b", 1.0, target=(">=", 2.0)),
            common.result("a", 2.0, "", "b", 1.0, target=("<=", 3.0)),
            common.result("a", 4.0, "", "b", 1.0, target=("<=", 3.0)),
            common.result("e", 0, "", target=("==", 0)),
            common.result("e", 2, "", target=("==", 0))]
    for row in rows:
        h = plot.headroom(row.to_json())
        assert h is not None and (h >= 1) == row.met, row
    assert plot.headroom(common.skipped("s", "why", target=("<", 1.0)).to_json()) is None


def test_run_py_saves_a_run_whose_unrunnable_benchmark_says_why(tmp_path: Path) -> None:
    fake = tmp_path / "no_model.py"
    fake.write_text("def available():\n    return 'no CUDA device here (test)'\n")
    out = tmp_path / "run.json"
    env = {"PYTHONPATH": f"{ROOT}:{tmp_path}", "BENCH_GPU_MODEL_MODULE": "no_model",
           "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, str(BENCH / "run.py"), "--only", "gpu", "--no-save",
                    "--json", str(out)], check=True, env=env, cwd=ROOT, timeout=120,
                   capture_output=True)
    record = json.loads(out.read_text())
    assert {"date", "commit", "machine", "mode", "results"} <= set(record)
    assert [r["met"] for r in record["results"]] == ["skipped: no CUDA device here (test)"] * 2
    assert all(r["goal_op"] for r in record["results"])


def test_plot_draws_saved_runs_and_prints_the_table(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is in the bench extra")
    rows = [common.result("ipc", 30.0, "µs", "floor", 10.0, target=("<=", 2.5)),
            common.skipped("gpu", "no CUDA device", "ms", target=("<", 1.0))]
    runs = []
    for i in range(2):
        path = tmp_path / f"run{i}.json"
        record = common.write_json(path, rows, "quick", 1.0)
        assert record["results"][0]["met"] is False
        runs.append(path)
    png = tmp_path / "p.png"
    assert plot.main([*map(str, runs), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = plot.markdown(plot.load(runs)[-1])
    assert "| ipc | 30 µs | floor | 10 | 3.00× | ≤ 2.5× | **no** |" in table
    assert "skipped: no CUDA device" in table


def test_a_row_with_a_baseline_but_no_ratio_is_never_judged_on_its_value() -> None:
    row = common.result("proxy streamed", 1000.0, "req/s", "LiteLLM proxy", 0.0,
                        target=(">=", 20.0))
    assert row.ratio is None and isinstance(row.met, str) and row.met.startswith("skipped")
    assert plot.headroom(row.to_json()) is None
