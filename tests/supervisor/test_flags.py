"""Worker and gateway flags: typos, bad values and ports are refused with one line, exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from spirit_gpu import cli
from spirit_gpu.supervisor import __main__ as entry
from tests.conftest import APPS, ROOT


def test_a_flag_close_to_ours_is_refused_with_a_suggestion(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        entry.parse(["main.py", "--job-timout", "3"])
    assert exc.value.code == 2
    assert "did you mean --job-timeout?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        entry.parse(["main.py", "--max-childern=2"])
    assert "did you mean --max-children?" in capsys.readouterr().err


def test_script_arguments_still_pass() -> None:
    ns, script_args = entry.parse(["main.py", "--model", "m", "--job-timeout", "3", "--",
                                   "--job-timout", "x"])
    assert ns.job_timeout == "3"
    assert script_args == ["--model", "m", "--job-timout", "x"]


@pytest.mark.parametrize(("args", "env", "line"), [
    (["--job-timeout", "abc"], {}, "--job-timeout: 'abc' is not a number"),
    ([], {"SPIRIT_JOB_TIMEOUT": "abc"}, "SPIRIT_JOB_TIMEOUT: 'abc' is not a number"),
    (["--max-children", "2.5"], {}, "--max-children: '2.5' is not a whole number"),
    (["--test-port", "99999"], {}, "--test-port: '99999' is not a port number (0-65535)"),
    ([], {"EASE_TEST_MODE": "ture"}, "EASE_TEST_MODE: 'ture' is not true or false"),
])
def test_bad_values_give_one_line_and_exit_2(args: list[str], env: dict[str, str], line: str,
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert entry.main([str(APPS / "behave.py"), *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"spirit-gpu: {line}")


def test_gateway_port_out_of_range_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["gateway", "--port", "99999", "--api-key", "k"]) == 2
    assert "--port: '99999' is not a port number (0-65535)" in capsys.readouterr().err


def test_gateway_flags_come_from_its_config(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["gateway", "--help"])
    out = capsys.readouterr().out
    assert "--api-key KEY" in out and "SPIRIT_LEASE_SECONDS" in out


def test_real_worker_refuses_a_typo() -> None:
    done = subprocess.run([sys.executable, "-m", "spirit_gpu.supervisor",
                           str(APPS / "behave.py"), "--job-timout", "3"],
                          capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert done.returncode == 2
    assert "did you mean --job-timeout?" in done.stderr
