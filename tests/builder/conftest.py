"""Real-world-shaped inputs for the builder tests, and helpers."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from spirit_gpu.builder.cli import main
from spirit_gpu.builder.wheel import metadata, wheel_name

REPO = Path(__file__).resolve().parents[2]

PROJECT_FILES = {
    ".dockerignore", f"wheels/{wheel_name(metadata())}",
    "Dockerfile", "LICENSE", "README.md", "api.json", "requirements.txt", "scripts/build.sh",
    "scripts/start.sh", "src/build.py", "src/main.py", "src/spirit_generated_model.py",
    "src/test_input.json",  # the sample request dev prints (inputs in a JSON form)
}

# An OpenAPI document in the reference's style: components.schemas.RequestInput,
# with a nested object, an enum, optional fields and constraints.
OPENAPI_COMPONENTS = """\
openapi: 3.0.3
info: {title: image generation, version: "1.0"}
paths: {}
components:
  schemas:
    RequestInput:
      type: object
      required: [prompt]
      properties:
        prompt: {type: string, minLength: 1, maxLength: 500, description: What to draw.}
        steps: {type: integer, minimum: 1, maximum: 100, default: 30}
        guidance: {type: number, nullable: true}
        scheduler: {$ref: '#/components/schemas/Scheduler'}
        size: {$ref: '#/components/schemas/Size'}
        tags: {type: array, items: {type: string}, maxItems: 5}
    Scheduler:
      type: string
      enum: [ddim, euler, dpm]
    Size:
      type: object
      required: [width, height]
      properties:
        width: {type: integer, minimum: 64, maximum: 2048}
        height: {type: integer, minimum: 64, maximum: 2048}
    Unrelated:
      type: object
      properties:
        audit: {type: string}
"""
OPENAPI_VALID = {"prompt": "a cat", "steps": 20, "scheduler": "euler",
                 "size": {"width": 512, "height": 512}}
OPENAPI_INVALID = {"steps": 20}

# The way most real OpenAPI documents are written: an operation whose JSON request
# body has an `input` property (here by $ref, with its own references).
OPENAPI_BODY = {
    "openapi": "3.1.0",
    "info": {"title": "transcribe", "version": "2"},
    "paths": {
        "/health": {"get": {"responses": {"200": {"description": "ok"}}}},
        "/v1/transcribe": {"post": {
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/TranscribeRequest"}}}},
            "responses": {"200": {"description": "ok"}},
        }},
    },
    "components": {"schemas": {
        "TranscribeRequest": {"type": "object", "required": ["input"], "properties": {
            "input": {"$ref": "#/components/schemas/TranscribeInput"},
            "webhook": {"type": "string", "format": "uri"}}},
        "TranscribeInput": {"type": "object", "required": ["audio"], "properties": {
            "audio": {"type": "string", "format": "uri"},
            "language": {"$ref": "#/components/schemas/Language"},
            "temperature": {"type": "number", "minimum": 0, "maximum": 1}}},
        "Language": {"type": "string", "enum": ["en", "de", "zh"]},
    }},
}
OPENAPI_BODY_VALID = {"audio": "http://x/a.wav", "language": "de"}
OPENAPI_BODY_INVALID = {"language": "fr"}

JSON_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "ChatInput",
    "type": "object",
    "required": ["messages"],
    "properties": {
        "messages": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/Message"}},
        "max_tokens": {"type": "integer", "exclusiveMinimum": 0, "default": 256},
        "stream": {"type": "boolean", "default": False},
    },
    "$defs": {"Message": {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"enum": ["system", "user", "assistant"]},
        "content": {"type": "string"}}}},
}
JSON_SCHEMA_VALID = {"messages": [{"role": "user", "content": "hi"}]}
JSON_SCHEMA_INVALID = {"max_tokens": 5}

EXAMPLE = {"text": "hello", "voice": "alloy", "speed": 1.25, "options": {"format": "wav"}}
EXAMPLE_YAML = "text: hello\nvoice: alloy\nspeed: 1.25\noptions:\n  format: wav\n"
EXAMPLE_INVALID = {"voice": "alloy", "speed": 1.25, "options": {"format": "wav"}}

# name -> (file name, content, valid input, input missing a required field, that field)
CASES: dict[str, tuple[str, str, dict[str, object], dict[str, object], str]] = {
    "openapi-components": ("api.yaml", OPENAPI_COMPONENTS, OPENAPI_VALID, OPENAPI_INVALID,
                           "prompt"),
    "openapi-body": ("openapi.json", json.dumps(OPENAPI_BODY), OPENAPI_BODY_VALID,
                     OPENAPI_BODY_INVALID, "audio"),
    "jsonschema": ("schema.json", json.dumps(JSON_SCHEMA), JSON_SCHEMA_VALID,
                   JSON_SCHEMA_INVALID, "messages"),
    "example-json": ("example.json", json.dumps(EXAMPLE), EXAMPLE, EXAMPLE_INVALID, "text"),
    "example-yaml": ("example.yaml", EXAMPLE_YAML, EXAMPLE, EXAMPLE_INVALID, "text"),
}


def write(path: Path, content: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content, encoding="utf-8")
    return path


def build(*argv: str) -> int:
    return main(list(argv))


def files_in(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def load_model(path: Path) -> ModuleType:
    """Import a generated model file under a unique name."""
    name = f"generated_{abs(hash(path))}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pydantic look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


@pytest.fixture
def isolated_imports() -> Iterator[None]:
    """Undo what importing a generated src/main.py does to sys.path and sys.modules."""
    saved_path = list(sys.path)
    yield
    sys.path[:] = saved_path
    sys.modules.pop("spirit_generated_model", None)
