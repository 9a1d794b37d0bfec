"""The sample input built from a schema (builder/sample.py) for src/test_input.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from spirit_gpu.builder.sample import sample_input
from tests.builder.conftest import build, files_in, write


@pytest.mark.parametrize(("schema", "sample"), [
    ({"type": "integer", "exclusiveMinimum": 0}, 1),
    ({"type": "integer", "maximum": -3}, -3),
    ({"type": "number", "minimum": 0.25, "maximum": 1}, 0.25),
    ({"type": "number", "exclusiveMaximum": 0}, -0.5),
    ({"type": "string", "minLength": 3}, "xxx"),
    ({"type": "string", "format": "date-time"}, "2024-01-01T00:00:00Z"),
    ({"type": ["null", "boolean"]}, False),
    ({"anyOf": [{"type": "null"}, {"type": "string", "format": "email"}]}, "user@example.com"),
    ({"type": "array", "minItems": 2, "items": {"const": 7}}, [7, 7]),
    ({"allOf": [{"type": "object", "required": ["a"], "properties": {"a": {"default": 1}}},
                {"type": "object", "required": ["b"], "properties": {"b": {"examples": ["e"]}}}]},
     {"a": 1, "b": "e"}),
    ({"properties": {"opt": {"type": "string"}}}, {}),  # optional fields are left out
])
def test_each_value_is_the_smallest_the_schema_accepts(schema: dict[str, Any],
                                                       sample: Any) -> None:
    assert sample_input(schema, schema) == sample


def test_a_schema_it_cannot_satisfy_gives_no_sample() -> None:
    looped = {"$ref": "#/$defs/Node", "$defs": {"Node": {
        "type": "object", "required": ["next"], "properties": {"next": {"$ref": "#/$defs/Node"}}}}}
    for schema in ({"type": "string", "pattern": "^[a-z]{3}$"}, looped):
        with pytest.raises(ValueError):
            sample_input(schema, schema)


def test_no_test_input_when_no_sample_fits(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    schema = {"type": "object", "required": ["code"],
              "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}$"}}}
    assert build("-i", str(write(tmp_path / "s.json", json.dumps(schema))),
                 "-o", str(tmp_path / "p")) == 0
    assert "src/test_input.json" not in files_in(tmp_path / "p")
    assert "no src/test_input.json" in " ".join(capsys.readouterr().out.split())
