"""A sample request input built from a schema, for ``src/test_input.json``.

`spirit-gpu dev src/main.py` prints a request to try with that file's content;
without one it sends a generic input that a generated project's validation
refuses. The sample holds the required fields only, each from the schema's own
example, default, const or first enum value where it has one, else the
smallest value of its type that fits the stated bounds. It is written only when
the generated RequestInput accepts it (``fits``): a schema with patterns or
formats this cannot satisfy gets no sample rather than one that fails.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from spirit_gpu.builder.openapi import MODEL_NAME
from spirit_gpu.builder.schema_check import resolve_pointer

_DEPTH = 32  # a schema that refers to itself stops here (and gets no sample)
_FORMATS = {"uri": "https://example.com", "url": "https://example.com",
            "date-time": "2024-01-01T00:00:00Z", "date": "2024-01-01", "time": "00:00:00",
            "email": "user@example.com", "uuid": "00000000-0000-4000-8000-000000000000",
            "ipv4": "127.0.0.1", "ipv6": "::1", "hostname": "example.com"}


class _NoSample(Exception):
    pass


def sample_input(schema: Any, root: Any) -> Any:
    """A value ``schema`` (``$ref``s resolved in ``root``) should accept; raises
    ValueError when none can be made."""
    try:
        return _sample(schema, root, 0)
    except _NoSample as exc:
        raise ValueError(str(exc)) from None


def _sample(schema: Any, root: Any, depth: int) -> Any:
    if depth > _DEPTH:
        raise _NoSample("the schema nests deeper than a sample goes")
    if schema is True or schema == {}:
        return {}
    if not isinstance(schema, dict):
        raise _NoSample(f"not a schema: {schema!r}")
    ref = schema.get("$ref")
    if isinstance(ref, str):
        try:
            return _sample(resolve_pointer(root, ref), root, depth + 1)
        except KeyError:
            raise _NoSample(f"$ref {ref!r} does not resolve") from None
    for key in ("example", "default", "const"):
        if key in schema:
            return schema[key]
    examples = schema.get("examples")
    if isinstance(examples, list) and examples:
        return examples[0]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    if isinstance(schema.get("allOf"), list):
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            value = _sample(part, root, depth + 1)
            if not isinstance(value, dict):
                return value
            merged.update(value)
        return merged
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            typed = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")]
            return _sample((typed or options)[0], root, depth + 1)
    return _of_type(schema, _type_of(schema), root, depth)


def _type_of(schema: dict[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if isinstance(kind, str):
        return kind
    return "object" if "properties" in schema else "string"


def _of_type(schema: dict[str, Any], kind: str, root: Any, depth: int) -> Any:
    if kind == "object":
        props = schema.get("properties") or {}
        required = schema.get("required") or []
        return {name: _sample(props.get(name, {}), root, depth + 1) for name in required}
    if kind == "array":
        count = int(schema.get("minItems") or 0)
        return [_sample(schema.get("items", {}), root, depth + 1) for _ in range(count)]
    if kind in ("integer", "number"):
        return _number(schema, kind == "integer")
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    if kind == "string":
        if "pattern" in schema:
            raise _NoSample("a string with a pattern")
        fmt = schema.get("format")
        if isinstance(fmt, str) and fmt in _FORMATS:
            return _FORMATS[fmt]
        return "x" * max(1, int(schema.get("minLength") or 0))
    raise _NoSample(f"type {kind!r}")


def _number(schema: dict[str, Any], integer: bool) -> int | float:
    step = 1 if integer else 0.5
    low, high = schema.get("minimum"), schema.get("maximum")
    ex_low, ex_high = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    value: float = 0
    if isinstance(low, int | float):
        value = low
    elif isinstance(ex_low, int | float) and not isinstance(ex_low, bool):
        value = ex_low + step
    if isinstance(high, int | float) and value > high:
        value = high
    if isinstance(ex_high, int | float) and not isinstance(ex_high, bool) and value >= ex_high:
        value = ex_high - step
    return int(value) if integer else value


def fits(model_code: str, value: Any) -> bool:
    """Whether the generated RequestInput (pydantic model or dataclass) accepts ``value``."""
    try:
        from pydantic import TypeAdapter
    except ImportError:
        return False
    name = "_spirit_sample_check"
    module = types.ModuleType(name)
    sys.modules[name] = module  # (pydantic resolves the model's annotations through it)
    try:
        exec(compile(model_code, "spirit_generated_model.py", "exec"), module.__dict__)
        model = module.__dict__[MODEL_NAME]
        rebuild = getattr(model, "model_rebuild", None)
        if callable(rebuild):
            rebuild()
        TypeAdapter(model).validate_python(value)
    except Exception:  # the generated code is the user's schema's: any failure means no
        return False
    finally:
        del sys.modules[name]
    return True
