"""Generating projects from real-world-shaped inputs, for each data type and handler kind."""

from __future__ import annotations

import ast
import dataclasses
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydantic
import pytest

import spirit_gpu
from spirit_gpu.builder.project import HANDLER_TYPES, render_main
from spirit_gpu.cli import example_body
from spirit_gpu.errors import HandlerError
from tests.builder.conftest import (
    CASES,
    OPENAPI_BODY,
    OPENAPI_COMPONENTS,
    PROJECT_FILES,
    build,
    files_in,
    load_model,
    write,
)

DATA_TYPES = ["pydantic_v2.BaseModel", "dataclasses.dataclass"]
# the required fields only: the schema's enum, format and bounds chose the values
SCHEMA_SAMPLES = {
    "openapi-components": {"prompt": "x"},
    "openapi-body": {"audio": "https://example.com"},
    "jsonschema": {"messages": [{"role": "system", "content": "x"}]},
}


@pytest.mark.parametrize("data_type", DATA_TYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_generates_project_with_working_model(tmp_path: Path, case: str, data_type: str) -> None:
    name, content, valid, invalid, field = CASES[case]
    source = write(tmp_path / "in" / name, content)
    out = tmp_path / "out"
    assert build("-i", str(source), "-o", str(out), "--data-type", data_type) == 0
    assert files_in(out) == PROJECT_FILES
    # dev prints this request: an example as it is, else the sample built from the schema
    sample = json.loads(example_body(str(out / "src/main.py")))["input"]
    assert sample == (valid if case.startswith("example") else SCHEMA_SAMPLES[case])
    model = load_model(out / "src/spirit_generated_model.py")
    request_input = model.RequestInput
    if data_type.startswith("pydantic"):
        assert issubclass(request_input, pydantic.BaseModel)
        request_input.model_validate(valid)
        request_input.model_validate(sample)
        with pytest.raises(pydantic.ValidationError) as info:
            request_input.model_validate(invalid)
        assert field in str(info.value)
    else:
        assert dataclasses.is_dataclass(request_input)
        names = {f.name for f in dataclasses.fields(request_input)}
        assert field in names and set(valid) <= names
        request_input(**valid)
        request_input(**sample)
        with pytest.raises(TypeError, match=field):
            request_input(**invalid)
    requirements = (out / "requirements.txt").read_text()
    assert "spirit-gpu" in requirements
    assert ("pydantic" in requirements) == data_type.startswith("pydantic")
    assert json.loads((out / "api.json").read_text()) is not None


def test_openapi_components_keep_constraints_enums_and_only_referenced_schemas(
        tmp_path: Path) -> None:
    source = write(tmp_path / "spec.yaml", OPENAPI_COMPONENTS)
    assert build("-i", str(source), "-o", str(tmp_path / "out")) == 0
    code = (tmp_path / "out/src/spirit_generated_model.py").read_text()
    assert "class Unrelated" not in code  # components RequestInput does not reference
    model = load_model(tmp_path / "out/src/spirit_generated_model.py")
    ok = model.RequestInput.model_validate({"prompt": "x"})
    assert ok.steps == 30 and ok.guidance is None and ok.size is None
    bad = {"prompt": "", "steps": 500, "scheduler": "nope", "size": {"width": 512},
           "tags": ["a"] * 6}
    with pytest.raises(pydantic.ValidationError) as info:
        model.RequestInput.model_validate(bad)
    locs = {".".join(map(str, e["loc"])) for e in info.value.errors()}
    assert {"prompt", "steps", "scheduler", "size.height", "tags"} <= locs
    # only what the schema calls nullable accepts null: steps is a plain integer
    assert model.RequestInput.model_validate({"prompt": "x", "guidance": None}).guidance is None
    with pytest.raises(pydantic.ValidationError) as info:
        model.RequestInput.model_validate({"prompt": "x", "steps": None})
    assert [e["loc"] for e in info.value.errors()] == [("steps",)]


@pytest.mark.parametrize("by_ref", [True, False])
def test_openapi_request_body_input_inline_or_ref(tmp_path: Path, by_ref: bool) -> None:
    doc: dict[str, Any] = json.loads(json.dumps(OPENAPI_BODY))
    if not by_ref:  # the body schema and its `input` written inline in the operation
        schemas = doc["components"]["schemas"]
        body = doc["paths"]["/v1/transcribe"]["post"]["requestBody"]["content"]
        body["application/json"]["schema"] = {
            "type": "object", "properties": {"input": schemas.pop("TranscribeInput")}}
        del schemas["TranscribeRequest"]
    source = write(tmp_path / "api.json", json.dumps(doc))
    assert build("-i", str(source), "-o", str(tmp_path)) == 0
    code = (tmp_path / "src/spirit_generated_model.py").read_text()
    assert "TranscribeRequest" not in code and "class Language" in code
    model = load_model(tmp_path / "src/spirit_generated_model.py")
    model.RequestInput.model_validate({"audio": "http://x/a.wav", "language": "zh"})
    with pytest.raises(pydantic.ValidationError, match="language"):
        model.RequestInput.model_validate({"audio": "http://x/a.wav", "language": "fr"})


@pytest.mark.parametrize(("kind", "content", "steps"), [
    ("dict", "{'prompt': 'hi', 'steps': 3}", 3),
    ("csv", "prompt,steps\nhi,3\n", "3"),  # CSV has no types: every column is a string
    ("graphql", "input RequestInput {\n  prompt: String!\n  steps: Int\n}\n", 3),
])
def test_text_input_types(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str,
                          content: str, steps: object) -> None:
    source = write(tmp_path / f"input.{kind}", content)
    assert build("-i", str(source), "--input-type", kind, "-o", str(tmp_path / "o")) == 0
    # no JSON form: the project keeps a copy of the input instead of api.json, and dev
    # sends its generic sample
    assert files_in(tmp_path / "o") == (PROJECT_FILES - {"api.json", "src/test_input.json"}
                                        | {f"api.{kind}"})
    model_file = tmp_path / "o/src/spirit_generated_model.py"
    model = load_model(model_file)
    assert model.RequestInput.model_validate({"prompt": "hi", "steps": steps}).steps == steps
    with pytest.raises(pydantic.ValidationError, match="prompt"):
        model.RequestInput.model_validate({"steps": steps})
    # the README's command regenerates the same model, in the project
    readme = (tmp_path / "o/README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("spirit-gpu-builder"))
    assert f"-i api.{kind} --input-type {kind}" in command and f"`api.{kind}`" in readme
    before = ast.dump(ast.parse(model_file.read_text()))  # (the code, not its layout)
    monkeypatch.chdir(tmp_path / "o")
    assert build(*shlex.split(command)[1:]) == 0
    assert ast.dump(ast.parse(model_file.read_text())) == before


def test_auto_detects_each_structured_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                           ) -> None:
    expected = {"openapi-components": "openapi", "openapi-body": "openapi",
                "jsonschema": "jsonschema", "example-json": "json", "example-yaml": "yaml"}
    for case, kind in expected.items():
        name, content, *_ = CASES[case]
        source = write(tmp_path / case / name, content)
        assert build("-i", str(source), "-o", str(tmp_path / case / "o"), "--model-only") == 0
        assert f"{kind} (asked: auto)" in capsys.readouterr().out


def _exec_main(source: str, monkeypatch: pytest.MonkeyPatch, src_dir: Path) -> dict[str, Any]:
    """Execute a generated src/main.py in-process, with start() recorded instead of run."""
    started: list[dict[str, Any]] = []
    monkeypatch.setattr(spirit_gpu, "start", started.append)
    namespace: dict[str, Any] = {"__name__": "generated_main",
                                 "__file__": str(src_dir / "main.py")}
    exec(compile(source, str(src_dir / "main.py"), "exec"), namespace)
    assert [list(s) for s in started] == [["handler"]]
    assert started[0]["handler"] is namespace["handler"]
    return namespace


async def _call(handler: Any, kind: str, request: dict[str, Any]) -> Any:
    env = spirit_gpu.Env(request_id="r1")
    if kind == "sync":
        return handler(request, env)
    if kind == "async":
        return await handler(request, env)
    if kind == "sync_generator":
        return list(handler(request, env))
    return [chunk async for chunk in handler(request, env)]


@pytest.mark.usefixtures("isolated_imports")
@pytest.mark.parametrize("data_type", DATA_TYPES)
@pytest.mark.parametrize("kind", HANDLER_TYPES)
async def test_generated_handler_validates_input(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, data_type: str) -> None:
    name, content, valid, invalid, field = CASES["openapi-components"]
    source = write(tmp_path / name, content)
    args = ["-i", str(source), "-o", str(tmp_path), "--data-type", data_type]
    assert build(*args, "--handler-type", kind) == 0
    main_source = (tmp_path / "src/main.py").read_text()
    assert main_source == render_main(data_type, kind)
    namespace = _exec_main(main_source, monkeypatch, tmp_path / "src")
    handler = namespace["handler"]
    result = await _call(handler, kind, {"input": valid})
    chunk = result if kind in ("sync", "async") else result[0]
    assert chunk["output"]["prompt"] == "a cat" and chunk["output"]["size"]["width"] == 512
    for bad, names in [(invalid, {field}), ({**valid, "nope": 1}, {"nope"}), (None, {"input"})]:
        if data_type.startswith("pydantic") and bad and "nope" in bad:
            continue  # pydantic models ignore unknown fields, as generated
        with pytest.raises(HandlerError) as info:
            await _call(handler, kind, {"input": bad})
        assert info.value.status_code == 400 and info.value.message == "invalid input"
        assert names <= {d["field"] for d in info.value.details}


def test_generated_python_passes_ruff(tmp_path: Path) -> None:
    for data_type in DATA_TYPES:
        for kind in HANDLER_TYPES:
            write(tmp_path / f"{kind}_{data_type[:4]}.py", render_main(data_type, kind))
    build_py = Path(spirit_gpu.__file__).parent / "builder/templates/project/src/build.py"
    write(tmp_path / "build.py", build_py.read_text())
    ruff = Path(sys.executable).parent / "ruff"
    # run where a user's project would be, so that spirit_gpu counts as third-party
    done = subprocess.run([str(ruff), "check", "--isolated", "--select", "E,F,W,I,B,UP", "."],
                          capture_output=True, text=True, check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(("case", "kind"), [
    ("openapi-components", "openapi"), ("openapi-body", "openapi"), ("jsonschema", "jsonschema"),
    ("example-json", "json"), ("example-yaml", "yaml"), ("example-json", "yaml"),
])
def test_explicit_input_types(tmp_path: Path, case: str, kind: str) -> None:
    name, content, valid, invalid, field = CASES[case]
    source = write(tmp_path / name, content)
    assert build("-i", str(source), "--input-type", kind, "-o", str(tmp_path), "--model-only") == 0
    model = load_model(tmp_path / "src/spirit_generated_model.py")
    model.RequestInput.model_validate(valid)
    with pytest.raises(pydantic.ValidationError, match=field):
        model.RequestInput.model_validate(invalid)
