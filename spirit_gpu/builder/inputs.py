"""Finding, reading and classifying the input file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from spirit_gpu.builder.errors import BuilderError

DEFAULT_FILES = ("api.yaml", "api.yml", "api.json")
INPUT_TYPES = ("auto", "openapi", "jsonschema", "json", "yaml", "dict", "csv", "graphql")
TEXT_TYPES = ("dict", "csv", "graphql")  # handed to datamodel-code-generator as text
_SUFFIX_TYPES = {".csv": "csv", ".graphql": "graphql", ".gql": "graphql", ".py": "dict"}
_SCHEMA_KEYS = ("$schema", "properties", "allOf", "anyOf", "oneOf", "$defs", "definitions")


@dataclass
class LoadedInput:
    """The input file, its resolved type, its text and (for JSON/YAML types) its data."""

    path: Path
    kind: str
    text: str
    data: Any = None


def locate(input_file: str | None, cwd: Path) -> Path:
    """The input file: the given one, else the first default file found in ``cwd``."""
    if input_file is not None:
        path = Path(input_file)
        if not path.is_absolute():
            path = cwd / path
        if not path.exists():
            raise BuilderError(f"input file not found: {input_file}")
        if not path.is_file():
            raise BuilderError(f"input file is not a regular file: {input_file}")
        return path
    for name in DEFAULT_FILES:
        if (cwd / name).is_file():
            return cwd / name
    raise BuilderError(
        f"no input file given and none of {', '.join(DEFAULT_FILES)} found in {cwd}",
        hint="pass the file describing your request input with -i FILE",
    )


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BuilderError(f"cannot read {path}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise BuilderError(f"cannot read {path}: {exc.strerror or exc}") from None


def parse_structured(path: Path, text: str, as_json: bool) -> Any:
    """JSON (with its line and column on error) or YAML (likewise)."""
    if as_json:
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise BuilderError(
                f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
            ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise BuilderError(f"{path}: invalid YAML{where}: {problem}") from None


def _classify(path: Path, data: Any, raw_kind: str) -> str:
    if not isinstance(data, dict):
        raise BuilderError(
            f"{path}: the top level is {type(data).__name__}, expected a JSON/YAML object",
            hint="describe the request `input` as an object (its fields become RequestInput)",
        )
    if "swagger" in data:
        raise BuilderError(f"{path}: Swagger 2.0 documents are not supported",
                           hint="convert the document to OpenAPI 3 first")
    if "asyncapi" in data:
        raise BuilderError(f"{path}: AsyncAPI documents are not supported")
    if "openapi" in data:
        return "openapi"
    if isinstance(data.get("type"), str) or any(key in data for key in _SCHEMA_KEYS):
        return "jsonschema"
    return raw_kind


def load(path: Path, requested: str) -> LoadedInput:
    """Read ``path`` and settle its type (``requested`` may be ``auto``)."""
    if requested not in INPUT_TYPES:
        choices = ", ".join(INPUT_TYPES)
        raise BuilderError(f"unknown input type {requested!r}; choose from {choices}")
    text = read_text(path)
    if not text.strip():
        raise BuilderError(f"{path}: the file is empty")
    kind = requested
    if kind == "auto":
        kind = _SUFFIX_TYPES.get(path.suffix.lower(), "auto")
    if kind in TEXT_TYPES:
        return LoadedInput(path, kind, text)
    data = parse_structured(path, text, as_json=kind == "json" or path.suffix.lower() == ".json")
    if kind == "auto":
        kind = _classify(path, data, "json" if path.suffix.lower() == ".json" else "yaml")
    elif kind == "openapi" and not (isinstance(data, dict) and "openapi" in data):
        raise BuilderError(f"{path}: not an OpenAPI document (no top-level `openapi` key)",
                           hint="use --input-type auto to let the builder detect the type")
    elif not isinstance(data, dict):
        _classify(path, data, kind)
    return LoadedInput(path, kind, text, data)
