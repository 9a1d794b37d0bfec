"""No silent overwrites, --force, --model-only, default lookup, api.json, the real command."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.builder.conftest import (
    EXAMPLE,
    JSON_SCHEMA,
    OPENAPI_COMPONENTS,
    PROJECT_FILES,
    REPO,
    build,
    files_in,
    write,
)

MODEL = "src/spirit_generated_model.py"


def _out(capsys: pytest.CaptureFixture[str]) -> str:
    return " ".join(capsys.readouterr().out.split())


def test_existing_files_are_kept_unless_force(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    source = write(tmp_path / "schema.json", json.dumps(JSON_SCHEMA))
    out = tmp_path / "proj"
    assert build("-i", str(source), "-o", str(out)) == 0
    assert "created" in _out(capsys)
    write(out / "src/main.py", "# my handler\n")
    write(out / "Dockerfile", "FROM mine\n")
    assert build("-i", str(source), "-o", str(out)) == 0
    text = _out(capsys)
    assert "Kept 2 existing file(s)" in text and "Dockerfile, src/main.py" in text
    assert "--force" in text and "unchanged" in text and "created" not in text
    assert (out / "src/main.py").read_text() == "# my handler\n"
    assert (out / "Dockerfile").read_text() == "FROM mine\n"
    assert build("-i", str(source), "-o", str(out), "--force") == 0
    assert "overwritten" in _out(capsys)
    assert (out / "src/main.py").read_text().startswith('"""spirit-gpu worker')
    assert "nvidia/cuda" in (out / "Dockerfile").read_text()


def test_full_run_keeps_changed_model_and_points_to_model_only(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "proj"
    assert build("-i", str(write(tmp_path / "a.json", json.dumps(EXAMPLE))), "-o", str(out)) == 0
    before = (out / MODEL).read_text()
    changed = write(tmp_path / "b.json", json.dumps({**EXAMPLE, "seed": 7}))
    capsys.readouterr()
    assert build("-i", str(changed), "-o", str(out)) == 0
    assert (out / MODEL).read_text() == before
    assert "regenerate it with --model-only" in _out(capsys)


def test_model_only_rewrites_just_the_model(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "proj"
    assert build("-i", str(write(tmp_path / "a.json", json.dumps(EXAMPLE))), "-o", str(out)) == 0
    write(out / "src/main.py", "# edited\n")
    snapshot = {p: (out / p).read_bytes() for p in PROJECT_FILES if p != MODEL}
    changed = write(tmp_path / "b.json", json.dumps({**EXAMPLE, "seed": 7}))
    capsys.readouterr()
    assert build("-i", str(changed), "-o", str(out), "--model-only") == 0
    assert "seed: int" in (out / MODEL).read_text()
    assert {p: (out / p).read_bytes() for p in snapshot} == snapshot
    text = _out(capsys)
    assert "overwritten" in text and "model only" in text


def test_model_only_in_empty_dir_writes_one_file(tmp_path: Path) -> None:
    source = write(tmp_path / "in.yaml", OPENAPI_COMPONENTS)
    assert build("-i", str(source), "-o", str(tmp_path / "o"), "--model-only") == 0
    assert files_in(tmp_path / "o") == {MODEL}


def test_default_input_in_cwd_and_api_json_round_trip(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "api.yml", OPENAPI_COMPONENTS)
    monkeypatch.chdir(tmp_path)
    assert build("-o", "gen") == 0  # finds api.yml
    gen = tmp_path / "gen"
    assert "class RequestInput" in (gen / MODEL).read_text()
    model = (gen / MODEL).read_text()
    # api.json holds the description: regenerating from it in the project gives the same model
    (gen / MODEL).unlink()
    monkeypatch.chdir(gen)
    assert build("--model-only") == 0
    assert (gen / MODEL).read_text() == model.replace("from api.yml", "from api.json")


def test_input_already_in_project_is_not_duplicated(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path / "api.yaml", OPENAPI_COMPONENTS)
    monkeypatch.chdir(tmp_path)
    assert build() == 0
    assert files_in(tmp_path) == PROJECT_FILES - {"api.json"} | {"api.yaml"}
    assert "stays api.yaml: the project already has it" in _out(capsys)
    assert "-i api.yaml --input-type openapi" in (tmp_path / "README.md").read_text()
    assert os.access(tmp_path / "scripts/start.sh", os.X_OK)
    start = (tmp_path / "scripts/start.sh").read_text()
    assert "exec python -m spirit_gpu.supervisor src/main.py" in start
    docker = (tmp_path / "Dockerfile").read_text()
    assert "--mount=type=cache,target=/root/.cache/pip" in docker
    assert "scripts/build.sh" in docker and 'CMD ["bash", "scripts/start.sh"]' in docker


def _command() -> list[str]:
    script = Path(sys.executable).parent / "spirit-gpu-builder"
    # the console script when the package is installed; else the same main() via -m
    return [str(script)] if script.exists() else [sys.executable, "-m", "spirit_gpu.builder"]


def test_real_command(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    source = write(tmp_path / "schema.json", json.dumps(JSON_SCHEMA))
    done = subprocess.run([*_command(), "-i", str(source), "-o", str(tmp_path / "p"),
                           "--handler-type", "async_generator"],
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert files_in(tmp_path / "p") == PROJECT_FILES
    assert "spirit-gpu dev src/main.py" in done.stdout and "docker build" in done.stdout
    # the install line pastes as printed: with the extra that dev needs
    assert "pip install -r requirements.txt 'spirit-gpu[gateway]'" in done.stdout
    assert "async def handler" in (tmp_path / "p/src/main.py").read_text()
    failed = subprocess.run([*_command()], capture_output=True, text=True, env=env,
                            cwd=tmp_path / "p/src", timeout=60, check=False)
    assert failed.returncode == 1
    assert "error: no input file given" in failed.stderr and "Traceback" not in failed.stderr


def test_console_script_entry_point_is_main() -> None:
    text = (REPO / "pyproject.toml").read_text()
    # the package's main checks the builder extra, then runs the CLI's main
    assert 'spirit-gpu-builder = "spirit_gpu.builder:main"' in text


@pytest.mark.parametrize("data_type", ["pydantic_v2.BaseModel", "dataclasses.dataclass"])
def test_readme_regenerate_command_works_inside_the_project(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_type: str) -> None:
    source = write(tmp_path / "specs" / "t2i.yaml", OPENAPI_COMPONENTS)
    out = tmp_path / "proj"
    assert build("-i", str(source), "-o", str(out), "--data-type", data_type) == 0
    def model_code() -> list[str]:  # the header names the source file; the code is the same
        text = (out / "src/spirit_generated_model.py").read_text()
        return [line for line in text.splitlines() if not line.startswith("#")]
    model = model_code()
    readme = (out / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("spirit-gpu-builder"))
    assert command == (f"spirit-gpu-builder -i api.json --input-type openapi "
                       f"--data-type {data_type} --model-only")
    monkeypatch.chdir(out)
    assert build(*shlex.split(command)[1:]) == 0
    assert model_code() == model
