"""Every user error ends in a clear message and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.builder.conftest import OPENAPI_BODY, build, write

SchemaCase = tuple[str, str, list[str], list[str]]

# (file name, content, extra arguments, phrases the message must contain)
CASES: dict[str, SchemaCase] = {
    "invalid-json": ("api.json", '{"type": "object",\n "properties": {,}}', [],
                     ["invalid JSON at line 2, column"]),
    "invalid-yaml": ("api.yaml", "openapi: 3.0.0\ncomponents: [a\n", [],
                     ["invalid YAML at line"]),
    "empty": ("api.yaml", "  \n", [], ["empty"]),
    "non-utf8": ("api.json", "\udcff", [], ["not UTF-8"]),
    "top-level-list": ("api.json", "[1, 2]", [], ["top level is list"]),
    "unknown-schema-type": (
        "schema.json",
        json.dumps({"type": "object", "properties": {"size": {"type": "object", "properties": {
            "width": {"type": "int"}}}}}),
        [], ["properties.size.properties.width.type", "unknown type 'int'"]),
    "dangling-ref": (
        "schema.json",
        json.dumps({"type": "object", "properties": {"a": {"$ref": "#/$defs/Nope"}}}),
        [], ["properties.a.$ref", "does not resolve"]),
    "external-ref": (
        "schema.json", json.dumps({"type": "object", "properties": {"a": {"$ref": "x.json"}}}),
        [], ["external reference"]),
    "openapi-bad-component": (
        "api.yaml",
        "openapi: 3.0.0\ncomponents:\n  schemas:\n    RequestInput:\n      type: object\n"
        "      properties:\n        n: {$ref: '#/components/schemas/N'}\n"
        "    N: {type: integr}\n",
        [], ["components.schemas.N.type", "integr"]),
    "openapi-no-input": (
        "api.json",
        json.dumps({**OPENAPI_BODY, "components": {"schemas": {
            "TranscribeRequest": {"type": "object", "properties": {"audio": {"type": "string"}}}
        }}}),
        [], ["no components.schemas.RequestInput", "request body", "`input`"]),
    "not-openapi": ("schema.json", json.dumps({"type": "object"}), ["--input-type", "openapi"],
                    ["not an OpenAPI document"]),
    "swagger2": ("api.json", json.dumps({"swagger": "2.0", "paths": {}}), [], ["Swagger 2.0"]),
    "not-an-object-dataclass": ("schema.json", json.dumps({"type": "string"}),
                                ["--data-type", "dataclasses.dataclass"],
                                ["no class RequestInput", "the top-level schema"]),
    "graphql-without-request-input": ("api.graphql", "type Query { a: Int }\n", [],
                                      ["no class RequestInput", "GraphQL"]),
    "graphql-syntax": ("api.graphql", "type { a", [], ["graphql", "Syntax Error"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_schema_and_file_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                case: str) -> None:
    name, content, extra, phrases = CASES[case]
    path = tmp_path / name
    if case == "non-utf8":
        path.write_bytes(b'{"a": "\xff"}')
    else:
        write(path, content)
    assert build("-i", str(path), "-o", str(tmp_path / "out"), *extra) == 1
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "Traceback" not in err and err.startswith("error:")
    for phrase in phrases:
        assert phrase in err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_no_input_file_lists_what_was_looked_for(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert build() == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "api.yaml, api.yml, api.json" in err and str(tmp_path) in err and "-i FILE" in err
    assert list(tmp_path.iterdir()) == []


def test_an_example_that_looks_like_a_schema_gets_a_hint(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = write(tmp_path / "ex.json", json.dumps({"type": "image", "url": "http://x"}))
    assert build("-i", str(example), "-o", str(tmp_path / "a")) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "unknown type 'image'" in err and "--input-type json" in err
    assert build("-i", str(example), "-o", str(tmp_path / "b"), "--input-type", "json") == 0


def test_missing_and_unreadable_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    assert build("-i", str(tmp_path / "nope.yaml")) == 1
    assert "input file not found" in capsys.readouterr().err
    (tmp_path / "dir.yaml").mkdir()
    assert build("-i", str(tmp_path / "dir.yaml")) == 1
    assert "not a regular file" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--input-type", "xml"], ["--data-type", "msgspec.Struct"],
                                  ["--handler-type", "threaded"], ["--bogus"]])
def test_unknown_choices_are_usage_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    source = write(tmp_path / "api.json", json.dumps({"a": 1}))
    assert build("-i", str(source), *args) == 2
    err = capsys.readouterr().err
    assert "usage: spirit-gpu-builder" in err and args[0] in err and "Traceback" not in err


def test_output_dir_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write(tmp_path / "api.json", json.dumps({"a": 1}))
    target = write(tmp_path / "taken", "x")
    assert build("-i", str(source), "-o", str(target)) == 1
    assert "is not a directory" in capsys.readouterr().err


def test_long_paths_are_not_wrapped_into_a_pipe(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    deep = tmp_path / ("a-rather-long-directory-name-" * 6)
    deep.mkdir()
    source = write(deep / "api.json", json.dumps({"a": 1}))
    target = write(deep / "taken", "x")
    assert build("-i", str(source), "-o", str(target)) == 1
    err = capsys.readouterr().err
    assert f"output directory {target} exists and is not a directory" in err
    assert len(err.splitlines()) == 1


def test_graphql_without_graphql_core_names_the_extra(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "graphql", None)  # import graphql raises ImportError
    source = write(tmp_path / "api.graphql", "input RequestInput {\n  prompt: String!\n}\n")
    assert build("-i", str(source), "-o", str(tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert "graphql-core is not installed" in err and "pip install 'spirit-gpu[builder]'" in err
