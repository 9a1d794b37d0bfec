"""A light structural check of JSON schemas, so a typo is reported with its location.

datamodel-code-generator quietly turns an unknown ``type`` or a dangling
``$ref`` into ``Any``; a worker that validates nothing is worse than an error.
"""

from __future__ import annotations

from typing import Any

from spirit_gpu.builder.errors import BuilderError

TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SUBSCHEMAS = ("not", "additionalProperties", "items", "contains", "propertyNames", "if",
               "then", "else", "unevaluatedProperties", "unevaluatedItems")


def resolve_pointer(root: Any, ref: str) -> Any:
    """The node a local ``#/a/b`` reference points at; ``KeyError`` when there is none."""
    node = root
    for raw in ref.removeprefix("#").strip("/").split("/") if ref != "#" else []:
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(ref)
    return node


def _fail(source: str, where: str, problem: str) -> BuilderError:
    return BuilderError(f"{source}: invalid schema at {where}: {problem}")


def _check_type(value: Any, source: str, where: str) -> None:
    names = value if isinstance(value, list) else [value]
    for name in names:
        if not isinstance(name, str) or name not in TYPES:
            raise _fail(source, f"{where}.type", f"unknown type {name!r} "
                        f"(one of {', '.join(sorted(TYPES))})")


def check_schema(node: Any, root: Any, source: str, where: str) -> None:
    """Raise ``BuilderError`` naming ``where`` for the first structural problem found."""
    if isinstance(node, bool):
        return
    if not isinstance(node, dict):
        raise _fail(source, where, f"expected a schema object, got {type(node).__name__}")
    ref = node.get("$ref")
    if isinstance(ref, str):
        if not ref.startswith("#"):
            raise _fail(source, f"{where}.$ref", f"external reference {ref!r} is not "
                        "supported; inline it or move it into this document")
        try:
            resolve_pointer(root, ref)
        except KeyError:
            raise _fail(source, f"{where}.$ref", f"reference {ref!r} does not resolve") from None
    if "type" in node:
        _check_type(node["type"], source, where)
    required = node.get("required")
    if required is not None and not (
        isinstance(required, list) and all(isinstance(item, str) for item in required)
    ):
        raise _fail(source, f"{where}.required", "expected a list of property names")
    if "enum" in node and not (isinstance(node["enum"], list) and node["enum"]):
        raise _fail(source, f"{where}.enum", "expected a non-empty list")
    _check_children(node, root, source, where)


def _check_children(node: dict[str, Any], root: Any, source: str, where: str) -> None:
    for key in _SUBSCHEMA_MAPS:
        if key in node:
            children = node[key]
            if not isinstance(children, dict):
                raise _fail(source, f"{where}.{key}", "expected an object of schemas")
            for name, child in children.items():
                check_schema(child, root, source, f"{where}.{key}.{name}")
    for key in _SUBSCHEMA_LISTS:
        if key in node:
            children = node[key]
            if not isinstance(children, list):
                raise _fail(source, f"{where}.{key}", "expected a list of schemas")
            for index, child in enumerate(children):
                check_schema(child, root, source, f"{where}.{key}[{index}]")
    for key in _SUBSCHEMAS:
        child = node.get(key)
        if isinstance(child, list) and key == "items":
            for index, item in enumerate(child):
                check_schema(item, root, source, f"{where}.items[{index}]")
        elif child is not None:
            check_schema(child, root, source, f"{where}.{key}")
